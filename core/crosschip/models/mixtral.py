"""Mixtral: Mistral with a mixture of experts in every layer (``block_sparse_moe``, experts
``w1`` gate, ``w3`` up, ``w2`` down; top-k weights always renormalised)."""

from __future__ import annotations

from transformers import MixtralConfig

from crosschip.errors import ConfigurationError
from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options
from crosschip.models.moe import MoEOptions


@register_model
class MixtralForCausalLM(DecoderForCausalLM):
    architectures = ("MixtralForCausalLM",)
    config_class = MixtralConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        if getattr(config, "router_jitter_noise", 0.0):
            raise ConfigurationError(
                f"config.json: router_jitter_noise={config.router_jitter_noise} multiplies the router's input by "
                "random noise in training, which crosschip does not implement; set it to 0.0")
        moe = MoEOptions(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                         intermediate_size=config.intermediate_size,
                         sparse_layers=(True,) * config.num_hidden_layers, norm_topk_prob=True,
                         block="block_sparse_moe", expert_roles=("w1", "w3", "w2"),
                         aux_loss_coef=float(config.router_aux_loss_coef),
                         output_router_logits=bool(config.output_router_logits))
        return llama_options(config, qkv_bias=False, o_bias=False, mlp_bias=False,
                             sliding_windows=sliding_windows(config), moe=moe)
