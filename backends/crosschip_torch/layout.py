"""The torch backend's physical layouts, as reversible transforms from canonical roles."""

from __future__ import annotations

from crosschip.layouts import IDENTITY, Chain, InterleaveQKV, InterleaveRows, Rename
from crosschip.specs import GatedMLPSpec, QKVSpec


def qkv_layout(spec: QKVSpec, ctx=None):
    heads = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    return Chain.of(
        InterleaveQKV("q.weight", "k.weight", "v.weight", "weight", *heads),
        InterleaveQKV("q.bias", "k.bias", "v.bias", "bias", *heads),
    )


def gated_mlp_layout(spec: GatedMLPSpec, ctx=None):
    return Chain.of(
        InterleaveRows("gate.weight", "up.weight", "gate_up_proj.weight"),
        InterleaveRows("gate.bias", "up.bias", "gate_up_proj.bias"),
        Rename.of(**{"down.weight": "down_proj.weight", "down.bias": "down_proj.bias"}),
    )


def identity_layout(spec, ctx=None):
    return IDENTITY
