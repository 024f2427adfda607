"""Qwen3-MoE: Qwen3 (per-head q/k norms) whose MLPs are mixtures of experts on the layers
``decoder_sparse_step`` and ``mlp_only_layers`` make sparse."""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options
from crosschip.models.moe import MoEOptions, sparse_layers


def moe_options(config, **overrides) -> MoEOptions:
    """The Qwen-MoE family's experts (OLMoE reads the same fields)."""
    base = dict(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                intermediate_size=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
                sparse_layers=sparse_layers(config, config.num_hidden_layers),
                norm_topk_prob=bool(config.norm_topk_prob), aux_loss_coef=float(config.router_aux_loss_coef),
                output_router_logits=bool(config.output_router_logits))
    base.update(overrides)
    return MoEOptions(**base)


@register_model
class Qwen3MoeForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen3MoeForCausalLM",)
    config_class = Qwen3MoeConfig

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, qk_norm=True, mlp_bias=False, sliding_windows=sliding_windows(config),
                             moe=moe_options(config))
