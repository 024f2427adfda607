"""StarCoder2 (transformers' Starcoder2ForCausalLM): a pre-norm decoder with LayerNorm (weight
and bias), a non-gated MLP ``c_proj(act(c_fc(x)))`` and biases on every projection. Not the
shape DecoderForCausalLM builds, so this file asks the runtime for each component itself."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Starcoder2Config

from crosschip.modeling.generation import KVCache
from crosschip.modeling.masks import AttentionMask
from crosschip.modeling import CausalLM, CausalLMOutput
from crosschip.models import register_model
from crosschip.models.decoder import DecoderOptions, SelfAttention
from crosschip.models.hf_config import head_dim_of, kv_heads_of, rope_spec, sliding_windows
from crosschip.specs import EmbeddingSpec, LayerNormSpec, LMHeadSpec, LossSpec, MLPSpec
from crosschip.weights import whole


def starcoder2_options(config) -> DecoderOptions:
    head_dim = head_dim_of(config)
    return DecoderOptions(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, num_kv_heads=kv_heads_of(config), head_dim=head_dim,
        norm_eps=config.norm_epsilon, rope=rope_spec(config, head_dim), activation=config.hidden_act,
        qkv_bias=config.use_bias, o_bias=config.use_bias, mlp_bias=config.use_bias,
        tie_embeddings=config.tie_word_embeddings, sliding_windows=sliding_windows(config),
        attention_dropout=config.attention_dropout, padding_idx=config.pad_token_id)


class Starcoder2Layer(nn.Module):
    def __init__(self, options: DecoderOptions, runtime, layer: int, residual_dropout: float):
        super().__init__()
        attn_norm = LayerNormSpec(options.hidden_size, options.norm_eps)
        mlp_norm = LayerNormSpec(options.hidden_size, options.norm_eps)
        # The projections take their input norm, so a backend may fuse norm and projection.
        self.self_attn = SelfAttention(options, runtime, layer, attn_norm)  # q/k/v, rope, attention, o
        self.mlp = runtime.mlp(MLPSpec(options.hidden_size, options.intermediate_size,
                                       activation=options.activation, bias=options.mlp_bias,
                                       input_norm=mlp_norm))
        self.input_layernorm = runtime.input_norm(attn_norm, self.self_attn.qkv_proj)
        self.post_attention_layernorm = runtime.input_norm(mlp_norm, self.mlp)
        self.residual_dropout = residual_dropout

    def forward(self, hidden, rotary, tables, mask, cache=None):
        attn = self.self_attn(self.input_layernorm(hidden), rotary, tables, mask, cache)
        hidden = hidden + nn.functional.dropout(attn, self.residual_dropout, self.training)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + nn.functional.dropout(mlp, self.residual_dropout, self.training)


@register_model
class Starcoder2ForCausalLM(CausalLM):
    architectures = ("Starcoder2ForCausalLM",)
    config_class = Starcoder2Config

    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        self.opts = options = starcoder2_options(config)
        self.embed_tokens = runtime.embedding(EmbeddingSpec(options.vocab_size, options.hidden_size,
                                                            options.padding_idx))
        self.layers = nn.ModuleList(Starcoder2Layer(options, runtime, i, config.residual_dropout)
                                    for i in range(options.num_layers))
        self.norm = runtime.layer_norm(LayerNormSpec(options.hidden_size, options.norm_eps))
        self.rotary_emb = runtime.rotary(options.rope)
        self.lm_head = runtime.lm_head(LMHeadSpec(options.hidden_size, options.vocab_size,
                                                  tied=options.tie_embeddings))
        if options.tie_embeddings:
            self.lm_head.tie_weights(self.embed_tokens)
        self.loss_fn = runtime.loss(LossSpec(options.vocab_size))
        self.embedding_dropout = config.embedding_dropout
        if not options.tie_embeddings:
            self.ignored_checkpoint_keys = frozenset()  # else a stored lm_head copy is skipped

    ignored_checkpoint_keys = frozenset({"lm_head.weight"})

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, cache=None,
                last_logits_only: bool = False) -> CausalLMOutput:
        past = cache.seq_len if cache is not None else 0  # the generation cache protocol
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        mask = AttentionMask(padding=attention_mask, q_offset=past)
        with self.runtime.autocast():
            hidden = nn.functional.dropout(self.embed_tokens(input_ids), self.embedding_dropout, self.training)
            tables = self.rotary_emb(position_ids, hidden.dtype)
            for layer in self.layers:
                hidden = layer(hidden, self.rotary_emb, tables, mask, cache)
            hidden = self.norm(hidden)
            logits = self.lm_head(hidden[:, -1:] if last_logits_only else hidden)
            loss = self.loss_fn(hidden, labels, self.lm_head, logits) if labels is not None else None
        return CausalLMOutput(logits=whole(logits), loss=loss)  # whole: gathered if TP sharded them

    def new_cache(self):
        return KVCache(self.opts.num_layers)

    @property
    def max_positions(self) -> int:
        return self.opts.rope.max_position_embeddings

    def blocks(self):
        return list(self.layers)

    def checkpoint_names(self):
        """Component module path -> {role prefix: Hugging Face prefix}. Other modules keep
        their path (``norm`` would be ``norm.weight``), so those are listed too."""
        names = {"embed_tokens": {"": "model.embed_tokens"}, "norm": {"": "model.norm"}}
        for i in range(self.opts.num_layers):
            ours, theirs = f"layers.{i}", f"model.layers.{i}"
            names[f"{ours}.self_attn.qkv_proj"] = {
                "q": f"{theirs}.self_attn.q_proj", "k": f"{theirs}.self_attn.k_proj",
                "v": f"{theirs}.self_attn.v_proj", "norm": f"{theirs}.input_layernorm"}
            names[f"{ours}.self_attn.o_proj"] = {"": f"{theirs}.self_attn.o_proj"}
            names[f"{ours}.mlp"] = {"up": f"{theirs}.mlp.c_fc", "down": f"{theirs}.mlp.c_proj",
                                    "norm": f"{theirs}.post_attention_layernorm"}
            names[f"{ours}.input_layernorm"] = {"": f"{theirs}.input_layernorm"}
            names[f"{ours}.post_attention_layernorm"] = {"": f"{theirs}.post_attention_layernorm"}
        return names
