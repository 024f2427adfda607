"""Qwen3: per-head RMSNorm on q and k before RoPE; head_dim independent of hidden / heads."""

from __future__ import annotations

from transformers import Qwen3Config

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options


@register_model
class Qwen3ForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen3ForCausalLM",)
    config_class = Qwen3Config

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, qk_norm=True, mlp_bias=False,
                             sliding_windows=sliding_windows(config))
