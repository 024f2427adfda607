"""OLMo-2: RMSNorms after attention and after the MLP (on their outputs, no input norms), and
q/k norms over the whole q and k projections."""

from __future__ import annotations

from transformers import Olmo2Config

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.llama import llama_options


@register_model
class Olmo2ForCausalLM(DecoderForCausalLM):
    architectures = ("Olmo2ForCausalLM",)
    config_class = Olmo2Config

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, norm_placement="post", qk_norm=True, qk_norm_scope="projection")
