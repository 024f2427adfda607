"""SmolLM3: Llama with RoPE left out on chosen layers (``no_rope_layers``: 1 rotates, 0 does not;
every fourth layer by default)."""

from __future__ import annotations

from transformers import SmolLM3Config

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options


@register_model
class SmolLM3ForCausalLM(DecoderForCausalLM):
    architectures = ("SmolLM3ForCausalLM",)
    config_class = SmolLM3Config

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, rope_layers=tuple(bool(x) for x in config.no_rope_layers),
                             sliding_windows=sliding_windows(config))
