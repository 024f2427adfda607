"""Phi-3: a Llama-shaped decoder whose Hugging Face checkpoint is already fused: ``qkv_proj`` as
``[Q; K; V]`` and ``gate_up_proj`` as ``[gate; up]`` halves. That fused form is its canonical
layout; the checkpoint transform below maps it to the component roles every backend reads."""

from __future__ import annotations

from transformers import Phi3Config

from crosschip.weights.layouts import IDENTITY, Chain, Concat, Rename
from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import sliding_windows
from crosschip.models.llama import llama_options


@register_model
class Phi3ForCausalLM(DecoderForCausalLM):
    architectures = ("Phi3ForCausalLM",)
    config_class = Phi3Config

    @classmethod
    def options(cls, config) -> DecoderOptions:
        return llama_options(config, qkv_bias=False, o_bias=False, mlp_bias=False,
                             sliding_windows=sliding_windows(config))

    def checkpoint_transform(self, path, info):
        o = self.opts
        if info.component == "qkv_projection":
            q, kv = o.num_heads * o.head_dim, o.num_kv_heads * o.head_dim
            return Concat(("q.weight", "k.weight", "v.weight"), "qkv_proj.weight", (q, kv, kv))
        if info.component == "gated_mlp":
            i = o.intermediate_size
            return Chain.of(Concat(("gate.weight", "up.weight"), "gate_up_proj.weight", (i, i)),
                            Rename.of(**{"down.weight": "down_proj.weight"}))
        return IDENTITY
