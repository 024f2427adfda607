"""Gemma 2: (1 + weight) RMSNorms before and after attention and the MLP, embeddings scaled by
sqrt(hidden), ``query_pre_attn_scalar`` attention scale, soft-capped attention and final logits,
alternating sliding-window layers and a GeGLU MLP."""

from __future__ import annotations

from transformers import Gemma2Config

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options


def gemma_options(config, **overrides) -> DecoderOptions:
    """What Gemma 2 and Gemma 3 share."""
    base = dict(activation=config.hidden_activation, norm_placement="sandwich", norm_offset=1.0,
                embedding_multiplier=config.hidden_size**0.5, round_embedding_multiplier=True,
                attention_scale=config.query_pre_attn_scalar**-0.5, sliding_windows=sliding_windows(config))
    base.update(overrides)
    return llama_options(config, **base)


@register_model
class Gemma2ForCausalLM(DecoderForCausalLM):
    architectures = ("Gemma2ForCausalLM",)
    config_class = Gemma2Config

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return gemma_options(config, attn_softcap=config.attn_logit_softcapping,
                             final_softcap=config.final_logit_softcapping)
