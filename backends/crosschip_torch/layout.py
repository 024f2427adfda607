"""The torch backend's physical layouts, as reversible transforms from canonical roles."""

from __future__ import annotations

from crosschip.layouts import IDENTITY, Chain, InterleaveQKV, InterleaveRows, Rename, ReplicateHeads
from crosschip.specs import GatedMLPSpec, QKVSpec
from crosschip_torch.parallel import kv_replicas


def qkv_layout(spec: QKVSpec, ctx=None):
    # When the TP degree exceeds the KV heads, each KV head is stored once per rank that needs it
    # (and interleaved as that many groups), so a dim-0 shard still holds whole groups.
    copies = kv_replicas(spec, ctx.parallel.tp if ctx is not None else 1)
    replicate = [ReplicateHeads(("k.weight", "v.weight", "k.bias", "v.bias"), spec.num_kv_heads, copies)]
    heads = (spec.num_heads, spec.num_kv_heads * copies, spec.head_dim)
    return Chain.of(
        *(replicate if copies > 1 else []),
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
