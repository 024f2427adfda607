"""Llama (1, 2, 3, 3.1, 3.2): GQA, RoPE with any rope_scaling, tied or untied embeddings,
optional attention and MLP biases."""

from __future__ import annotations

from transformers import LlamaConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import head_dim_of, kv_heads_of, rope_spec


def llama_options(config, **overrides) -> DecoderOptions:
    """The Llama family's options; other families start here and override what differs."""
    head_dim = head_dim_of(config)
    bias = bool(getattr(config, "attention_bias", False))
    base = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=kv_heads_of(config),
        head_dim=head_dim,
        norm_eps=config.rms_norm_eps,
        rope=rope_spec(config, head_dim),
        activation=getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_embeddings=bool(config.tie_word_embeddings),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        padding_idx=getattr(config, "pad_token_id", None),
    )
    base.update(overrides)
    return DecoderOptions(**base)


@register_model
class LlamaForCausalLM(DecoderForCausalLM):
    architectures = ("LlamaForCausalLM",)
    config_class = LlamaConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config)
