"""Qwen2: biases on q, k and v (not on o_proj), sliding window on the layers its config names."""

from __future__ import annotations

from transformers import Qwen2Config

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options


@register_model
class Qwen2ForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen2ForCausalLM",)
    config_class = Qwen2Config

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, qkv_bias=True, o_bias=False, mlp_bias=False,
                             sliding_windows=sliding_windows(config))
