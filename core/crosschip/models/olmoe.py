"""OLMoE: a pre-norm mixture-of-experts decoder whose q/k norms span the whole projection
(RMSNorm over ``num_heads * head_dim``), with Qwen-MoE's router and expert names."""

from __future__ import annotations

from transformers import OlmoeConfig

from crosschip.errors import ConfigurationError
from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.llama import llama_options
from crosschip.models.qwen3_moe import moe_options


@register_model
class OlmoeForCausalLM(DecoderForCausalLM):
    architectures = ("OlmoeForCausalLM",)
    config_class = OlmoeConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        if getattr(config, "clip_qkv", None) is not None:
            raise ConfigurationError(f"config.json: clip_qkv={config.clip_qkv} (clamping q, k and v) is not "
                                     "implemented; OLMoE's released checkpoints leave it null")
        return llama_options(config, qk_norm=True, qk_norm_scope="projection", mlp_bias=False,
                             moe=moe_options(config, intermediate_size=config.intermediate_size))
