"""Mistral: Llama with sliding-window attention."""

from __future__ import annotations

from transformers import MistralConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options


@register_model
class MistralForCausalLM(DecoderForCausalLM):
    architectures = ("MistralForCausalLM",)
    config_class = MistralConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, qkv_bias=False, o_bias=False, mlp_bias=False,
                             sliding_windows=sliding_windows(config))
