"""GPT-NeoX (Pythia): LayerNorms with bias, attention and MLP side by side on the same input
(``use_parallel_residual``), a non-gated GELU MLP, partial rotary, biases everywhere, and q, k and
v fused per head in the checkpoint (``query_key_value``: ``[q_h; k_h; v_h]`` for each head h).
Not the shape DecoderForCausalLM builds, so its block is written here from the runtime's
components (the attention half is the decoder's)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXConfig

from crosschip.modeling import CausalLM, CausalLMOutput
from crosschip.modeling.generation import kv_cache
from crosschip.modeling.masks import AttentionMask
from crosschip.models import register_model
from crosschip.models.decoder import DecoderOptions, SelfAttention
from crosschip.models.hf_config import rope_spec
from crosschip.specs import EmbeddingSpec, LayerNormSpec, LMHeadSpec, LossSpec, MLPSpec
from crosschip.weights import whole
from crosschip.weights.layouts import IDENTITY, Chain, InterleaveQKV


def gpt_neox_options(config) -> DecoderOptions:
    head_dim = config.hidden_size // config.num_attention_heads
    return DecoderOptions(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_heads, head_dim=head_dim, norm_eps=config.layer_norm_eps,
        rope=rope_spec(config, head_dim), activation=config.hidden_act, qkv_bias=config.attention_bias,
        o_bias=config.attention_bias, mlp_bias=True, tie_embeddings=config.tie_word_embeddings,
        attention_dropout=float(config.attention_dropout))


class GPTNeoXLayer(nn.Module):
    def __init__(self, o: DecoderOptions, rt, layer: int, parallel_residual: bool, dropout: float):
        super().__init__()
        attn_norm, mlp_norm = LayerNormSpec(o.hidden_size, o.norm_eps), LayerNormSpec(o.hidden_size, o.norm_eps)
        self.attention = SelfAttention(o, rt, layer, attn_norm)
        self.mlp = rt.mlp(MLPSpec(o.hidden_size, o.intermediate_size, activation=o.activation, bias=True,
                                  input_norm=mlp_norm))
        # Identities when a backend fused the norm into the projection that follows it.
        self.input_layernorm = rt.input_norm(attn_norm, self.attention.qkv_proj)
        self.post_attention_layernorm = rt.input_norm(mlp_norm, self.mlp)
        self.parallel_residual = parallel_residual
        self.dropout = dropout

    def forward(self, hidden, rotary, tables, mask, cache=None):
        drop = lambda x: nn.functional.dropout(x, self.dropout, self.training)  # noqa: E731
        attn = drop(self.attention(self.input_layernorm(hidden), rotary, tables, mask, cache))
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return hidden + attn + drop(self.mlp(self.post_attention_layernorm(hidden)))
        hidden = hidden + attn
        return hidden + drop(self.mlp(self.post_attention_layernorm(hidden)))


@register_model
class GPTNeoXForCausalLM(CausalLM):
    architectures = ("GPTNeoXForCausalLM",)
    config_class = GPTNeoXConfig

    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        self.opts = o = gpt_neox_options(config)
        self.embed_in = runtime.embedding(EmbeddingSpec(o.vocab_size, o.hidden_size))
        self.layers = nn.ModuleList(GPTNeoXLayer(o, runtime, i, config.use_parallel_residual, config.hidden_dropout)
                                    for i in range(o.num_layers))
        self.final_layer_norm = runtime.layer_norm(LayerNormSpec(o.hidden_size, o.norm_eps))
        self.rotary_emb = runtime.rotary(o.rope)
        self.embed_out = runtime.lm_head(LMHeadSpec(o.hidden_size, o.vocab_size, tied=o.tie_embeddings))
        if o.tie_embeddings:
            self.embed_out.tie_weights(self.embed_in)
            self.ignored_checkpoint_keys = frozenset({"embed_out.weight"})
        self.loss_fn = runtime.loss(LossSpec(o.vocab_size))
        self.dropout = config.hidden_dropout

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, cache=None,
                last_logits_only: bool = False) -> CausalLMOutput:
        past = cache.seq_len if cache is not None else 0  # the generation cache protocol
        if position_ids is None:
            position_ids = (past + torch.arange(input_ids.shape[1], device=input_ids.device))[None]
        mask = AttentionMask(padding=attention_mask, q_offset=past)
        with self.runtime.autocast():
            hidden = nn.functional.dropout(self.embed_in(input_ids), self.dropout, self.training)
            tables = self.rotary_emb(position_ids, hidden.dtype)
            for layer in self.layers:
                hidden = layer(hidden, self.rotary_emb, tables, mask, cache)
            hidden = self.final_layer_norm(hidden)
            logits = self.embed_out(hidden[:, -1:] if last_logits_only else hidden)
            loss = self.loss_fn(hidden, labels, self.embed_out, logits) if labels is not None else None
        return CausalLMOutput(logits=whole(logits), loss=loss)

    def new_cache(self, max_length: int | None = None, device=None):
        return kv_cache(self.opts.num_layers, max_length, device)

    @property
    def max_positions(self) -> int:
        return self.opts.rope.max_position_embeddings

    def blocks(self):
        return list(self.layers)

    def checkpoint_transform(self, path, info):
        if info.component != "qkv_projection":
            return IDENTITY
        o = self.opts  # one query head per group: [q_h; k_h; v_h] per head
        heads = (o.num_heads, o.num_heads, o.head_dim)
        return Chain.of(InterleaveQKV("q.weight", "k.weight", "v.weight", "query_key_value.weight", *heads),
                        InterleaveQKV("q.bias", "k.bias", "v.bias", "query_key_value.bias", *heads))

    def checkpoint_names(self):
        names = {"embed_in": {"": "gpt_neox.embed_in"}, "final_layer_norm": {"": "gpt_neox.final_layer_norm"}}
        for i in range(self.opts.num_layers):
            ours, theirs = f"layers.{i}", f"gpt_neox.layers.{i}"
            names[f"{ours}.attention.qkv_proj"] = {"": f"{theirs}.attention", "norm": f"{theirs}.input_layernorm"}
            names[f"{ours}.attention.o_proj"] = {"": f"{theirs}.attention.dense"}
            names[f"{ours}.mlp"] = {"up": f"{theirs}.mlp.dense_h_to_4h", "down": f"{theirs}.mlp.dense_4h_to_h",
                                    "norm": f"{theirs}.post_attention_layernorm"}
            for norm in ("input_layernorm", "post_attention_layernorm"):
                names[f"{ours}.{norm}"] = {"": f"{theirs}.{norm}"}
        return names
