"""The neuron backend's physical layouts: the global view of the shards NxD's layers hold (each
rank's shard is the r-th of tp equal row blocks, or column blocks for row-parallel weights),
reached from canonical roles by reversible transforms.

KV heads. Where tp exceeds the KV heads, each is stored once per rank (``kv_size_multiplier``
copies) and NxD sums the copies' gradients over its KV-shared groups, whose arrangement depends
on the platform: on trn2 a head's copies sit on adjacent ranks, on trn1 the heads are tiled
(rank r holds head ``r mod kv_heads``). Which ranks share a head is read from NxD's own
``arrange_kv_groups`` for the platform target, so the weights follow NxD: group g holds KV head
g, and the c-th rank of a group serves the c-th slice of that head's query group. Query heads
(and the matching input columns of ``o_proj``) are permuted to follow; a layout for the wrong
platform computes the same forward but sums K/V gradients over ranks holding other heads.
"""

from __future__ import annotations

from functools import lru_cache

from crosschip.errors import ConfigurationError
from crosschip.parallel.kv_replication import kv_copies
from crosschip.weights.layouts import IDENTITY, BlockConcat, Chain, GatherHeads, InterleaveBlocks, Rename
from crosschip.specs import GatedMLPSpec, LinearSpec, QKVSpec
from crosschip_neuron.options import fused_qkv

KNOWN_PLATFORMS = ("trn1", "trn1n", "inf2", "trn2", "trn3")


def _tp(ctx) -> int:
    return ctx.parallel.tp if ctx is not None else 1


def platform() -> str:
    from crosschip_neuron.cpu_mode import platform_target

    return platform_target()


@lru_cache(maxsize=None)
def kv_groups(tp: int, copies: int, target: str) -> tuple[tuple[int, ...], ...]:
    """NxD's KV-shared rank groups at degree ``tp`` for ``copies`` replicas on ``target``."""
    from crosschip_neuron.cpu_mode import nxd

    nxd()
    from neuronx_distributed.parallel_layers.parallel_state import arrange_kv_groups
    from neuronx_distributed.utils.utils import hardware

    kind = hardware(target)
    if kind is None or kind == hardware.CUSTOM:
        raise ConfigurationError(
            f"platform target {target!r} (NEURON_PLATFORM_TARGET_OVERRIDE or the Neuron SDK) is not one "
            f"neuronx-distributed arranges KV heads for: expected one of {', '.join(KNOWN_PLATFORMS)}")
    groups = arrange_kv_groups(1, tp, copies, False, kind)
    ranks = sorted(r for g in groups for r in g)
    if ranks != list(range(tp)) or any(len(g) != copies for g in groups):
        raise ConfigurationError(f"neuronx-distributed's KV groups {groups} for tp={tp}, kv_size_multiplier="
                                 f"{copies} on {target} do not give each rank one KV head")
    return tuple(tuple(g) for g in groups)


def head_orders(spec: QKVSpec, tp: int, target: str | None = None):
    """``(query order, kv order, label)``: the canonical query heads and KV heads in physical
    order (rank by rank), and the arrangement's name. Identity orders where nothing is
    replicated (every rank then holds a contiguous range of both)."""
    copies = kv_copies(spec, tp)
    if copies == 1:
        return tuple(range(spec.num_heads)), tuple(range(spec.num_kv_heads)), ""
    target = target or platform()
    groups = kv_groups(tp, copies, target)
    per_rank = spec.num_heads // tp  # each rank: one KV head and this share of its query group
    head_of, copy_of = {}, {}
    for head, ranks in enumerate(groups):
        for copy, rank in enumerate(sorted(ranks)):
            head_of[rank], copy_of[rank] = head, copy
    queries = tuple(head_of[r] * spec.group_size + copy_of[r] * per_rank + i
                    for r in range(tp) for i in range(per_rank))
    adjacent = all(list(g) == list(range(g[0], g[0] + copies)) for g in groups)
    label = f"{target}: {'adjacent' if adjacent else 'tiled'} KV replicas"
    return queries, tuple(head_of[r] for r in range(tp)), label


def _gathers(spec: QKVSpec, tp: int):
    queries, kvs, label = head_orders(spec, tp)
    steps = []
    if queries != tuple(range(spec.num_heads)):
        steps.append(GatherHeads(("q.weight", "q.bias"), queries, spec.num_heads, 0, label))
    if kvs != tuple(range(spec.num_kv_heads)):
        steps.append(GatherHeads(("k.weight", "v.weight", "k.bias", "v.bias"), kvs, spec.num_kv_heads, 0, label))
    return steps, len(kvs)


def qkv_layout(spec: QKVSpec, ctx=None):
    tp = _tp(ctx)
    steps, kv_heads = _gathers(spec, tp)
    d = spec.head_dim
    if fused_qkv():
        rows = (spec.q_size, kv_heads * d, kv_heads * d)
        return Chain.of(*steps,
                        BlockConcat(("q.weight", "k.weight", "v.weight"), "weight_qkv", rows, tp),
                        BlockConcat(("q.bias", "k.bias", "v.bias"), "bias_qkv", rows, tp))
    return Chain.of(*steps, Rename.of(**{f"{r}.{p}": f"{p}_{r}" for r in "qkv" for p in ("weight", "bias")}))


def out_projection_layout(spec: LinearSpec, ctx=None):
    """``o_proj``'s input columns follow the query heads (the attention output is this rank's
    heads, in physical order)."""
    tp = _tp(ctx)
    if spec.input_heads is None or tp == 1:
        return IDENTITY
    heads, kv_heads = spec.input_heads
    qkv = QKVSpec(spec.out_features, heads, kv_heads, spec.in_features // heads)
    queries, _, label = head_orders(qkv, tp)
    if queries == tuple(range(qkv.num_heads)):
        return IDENTITY
    return GatherHeads(("weight",), queries, qkv.num_heads, 1, label)


def gated_mlp_layout(spec: GatedMLPSpec, ctx=None):
    # ColumnParallelLinear(stride=2): rank r holds [gate rows of r; up rows of r].
    tp = _tp(ctx)
    return Chain.of(
        InterleaveBlocks("gate.weight", "up.weight", "gate_up_proj.weight", tp),
        InterleaveBlocks("gate.bias", "up.bias", "gate_up_proj.bias", tp),
        Rename.of(**{"down.weight": "down_proj.weight", "down.bias": "down_proj.bias"}),
    )


def identity_layout(spec, ctx=None):
    return IDENTITY
