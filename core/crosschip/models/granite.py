"""Granite: Llama with embedding, residual, attention and logits multipliers."""

from __future__ import annotations

from transformers import GraniteConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.llama import llama_options


@register_model
class GraniteForCausalLM(DecoderForCausalLM):
    architectures = ("GraniteForCausalLM",)
    config_class = GraniteConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(
            config,
            embedding_multiplier=float(config.embedding_multiplier),
            residual_multiplier=float(config.residual_multiplier),
            attention_scale=float(config.attention_multiplier),
            logits_divisor=float(config.logits_scaling),
        )
