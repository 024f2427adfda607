"""Gemma 3 (text): Gemma 2's block with per-head (1 + weight) q/k norms, its own RoPE for the
sliding-window (local) and the full-attention (global) layers, and soft-capping only where the
config asks for it."""

from __future__ import annotations

from transformers import Gemma3TextConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.gemma2 import gemma_options
from crosschip.models.hf_config import head_dim_of, rope_spec


@register_model
class Gemma3ForCausalLM(DecoderForCausalLM):
    architectures = ("Gemma3ForCausalLM",)
    config_class = Gemma3TextConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        head_dim = head_dim_of(config)
        ropes = tuple(rope_spec(config, head_dim, layer_type) for layer_type in config.layer_types)
        return gemma_options(config, qk_norm=True, rope=rope_spec(config, head_dim, "full_attention"),
                             layer_ropes=ropes, attn_softcap=config.attn_logit_softcapping,
                             final_softcap=config.final_logit_softcapping)
