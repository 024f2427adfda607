"""The torch backend's physical layouts, as reversible transforms from canonical roles."""

from __future__ import annotations

from crosschip.weights.layouts import IDENTITY, Chain, InterleaveRows, Rename, grouped_qkv
from crosschip.specs import GatedMLPSpec, QKVSpec


def qkv_layout(spec: QKVSpec, ctx=None):
    # When the TP degree exceeds the KV heads, each KV head is stored once per rank that needs it
    # (and interleaved as that many groups), so a dim-0 shard still holds whole groups.
    return Chain.of(*grouped_qkv(spec, ctx.parallel.tp if ctx is not None else 1, "weight", "bias"))


def gated_mlp_layout(spec: GatedMLPSpec, ctx=None):
    return Chain.of(
        InterleaveRows("gate.weight", "up.weight", "gate_up_proj.weight"),
        InterleaveRows("gate.bias", "up.bias", "gate_up_proj.bias"),
        Rename.of(**{"down.weight": "down_proj.weight", "down.bias": "down_proj.bias"}),
    )


def mlp_layout(spec, ctx=None):
    return Rename.of(**{f"{r}.{p}": f"{r}_proj.{p}" for r in ("up", "down") for p in ("weight", "bias")})


def identity_layout(spec, ctx=None):
    return IDENTITY
