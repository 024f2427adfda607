"""A pre-norm decoder-only transformer built only from runtime components. Model files describe
their architecture as a :class:`DecoderOptions` and reuse these blocks; nothing here knows about
any backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crosschip.masks import AttentionMask
from crosschip.modeling import CausalLM, CausalLMOutput
from crosschip.runtime import Runtime
from crosschip.specs import (
    AttentionSpec,
    EmbeddingSpec,
    GatedMLPSpec,
    LinearSpec,
    LMHeadSpec,
    LossSpec,
    NormSpec,
    QKVSpec,
    RopeSpec,
)


@dataclass(frozen=True)
class DecoderOptions:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope: RopeSpec
    activation: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    padding_idx: int | None = None


class SelfAttention(nn.Module):
    def __init__(self, o: DecoderOptions, rt: Runtime, input_norm: NormSpec):
        super().__init__()
        self.qkv_proj = rt.qkv_projection(QKVSpec(
            o.hidden_size, o.num_heads, o.num_kv_heads, o.head_dim, bias=o.attention_bias,
            input_norm=input_norm))
        self.attn = rt.attention(AttentionSpec(
            o.num_heads, o.num_kv_heads, o.head_dim, causal=True, sliding_window=o.sliding_window,
            dropout=o.attention_dropout))
        self.o_proj = rt.out_projection(LinearSpec(
            o.num_heads * o.head_dim, o.hidden_size, bias=o.attention_bias, parallel="row"))

    def forward(self, hidden, rotary, tables, mask):
        q, k, v = self.qkv_proj(hidden)
        q, k = rotary.apply(q, k, tables)
        return self.o_proj(self.attn(q, k, v, mask))


class DecoderLayer(nn.Module):
    def __init__(self, o: DecoderOptions, rt: Runtime):
        super().__init__()
        attn_norm = NormSpec(o.hidden_size, o.norm_eps)
        mlp_norm = NormSpec(o.hidden_size, o.norm_eps)
        self.self_attn = SelfAttention(o, rt, attn_norm)
        self.mlp = rt.gated_mlp(GatedMLPSpec(
            o.hidden_size, o.intermediate_size, activation=o.activation, bias=o.mlp_bias,
            input_norm=mlp_norm))
        # Identity when the projection's backend fused the norm in.
        self.input_layernorm = rt.input_norm(attn_norm, self.self_attn.qkv_proj)
        self.post_attention_layernorm = rt.input_norm(mlp_norm, self.mlp)

    def forward(self, hidden, rotary, tables, mask):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary, tables, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderModel(nn.Module):
    def __init__(self, o: DecoderOptions, rt: Runtime):
        super().__init__()
        self.embed_tokens = rt.embedding(EmbeddingSpec(o.vocab_size, o.hidden_size, o.padding_idx))
        self.layers = nn.ModuleList(DecoderLayer(o, rt) for _ in range(o.num_layers))
        self.norm = rt.rms_norm(NormSpec(o.hidden_size, o.norm_eps))
        self.rotary_emb = rt.rotary(o.rope)

    def forward(self, input_ids, mask: AttentionMask, position_ids):
        hidden = self.embed_tokens(input_ids)
        tables = self.rotary_emb(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, self.rotary_emb, tables, mask)
        return self.norm(hidden)


class DecoderForCausalLM(CausalLM):
    """Decoder + LM head + loss. Subclasses turn a Hugging Face config into DecoderOptions."""

    @classmethod
    def options(cls, config) -> DecoderOptions:
        raise NotImplementedError(f"{cls.__name__} must describe its architecture")

    def __init__(self, config, runtime: Runtime):
        super().__init__(config, runtime)
        o = self.options(config)
        self.model = DecoderModel(o, runtime)
        self.lm_head = runtime.lm_head(LMHeadSpec(o.hidden_size, o.vocab_size, tied=o.tie_embeddings))
        if o.tie_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.loss_fn = runtime.loss(LossSpec(o.vocab_size))
        self.num_layers = o.num_layers

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                return_logits: bool = True) -> CausalLMOutput:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = AttentionMask(padding=attention_mask)
        hidden = self.model(input_ids, mask, position_ids)
        logits = self.lm_head(hidden) if return_logits else None
        loss = self.loss_fn(hidden, labels, self.lm_head, logits) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def checkpoint_names(self) -> dict[str, dict[str, str]]:
        names = {}
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            names[f"{p}.self_attn.qkv_proj"] = {
                "q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj",
                "v": f"{p}.self_attn.v_proj", "norm": f"{p}.input_layernorm"}
            names[f"{p}.mlp"] = {
                "gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj",
                "down": f"{p}.mlp.down_proj", "norm": f"{p}.post_attention_layernorm"}
        return names
