"""Where each attention head sits in the global (rank-by-rank) view of NxD's GQA QKV weights.

``query_order(spec)[j]`` is the Hugging Face query head held by physical head ``j`` (rank
``j // (heads / tp)``), and ``kv_order(spec)[j]`` the KV head held by physical KV head ``j``; the
``o_proj`` input columns follow the query order. Pure integers: the same arithmetic serves
consolidation (gather by the inverse) and sharding (gather by the order).
"""

from __future__ import annotations

import dataclasses

from crosschip.checkpoint.nxd.metadata import INTERLEAVE, TILE, GQAQKV


def kv_order(spec: GQAQKV) -> list[int]:
    copies, kv = spec.copies, spec.kv_heads
    if spec.kv_layout == INTERLEAVE:  # each head's copies adjacent
        return [j // copies for j in range(kv * copies)]
    return [j % kv for j in range(kv * copies)]  # tiled: the KV weight repeated ``copies`` times


def query_order(spec: GQAQKV) -> list[int]:
    if spec.kv_layout == INTERLEAVE or spec.copies == 1:
        return list(range(spec.heads))  # each rank's queries are the contiguous group of its KV heads
    return _tiled_queries(spec.tp, spec.heads, spec.kv_heads, spec.copies)


def _tiled_queries(tp: int, heads: int, kv: int, copies: int) -> list[int]:
    """Optimum Neuron's query permutation for tiled KV replicas (its
    ``compute_query_indices_for_rank``, over every rank): rank r serves the KV heads it holds,
    ``kv_order`` tiled, and for each the next unserved slice of that head's query group."""
    per_rank = heads // tp
    kv_per_rank = kv * copies // tp
    group = heads // kv  # query heads per KV head
    served = per_rank // kv_per_rank  # of one KV head's group, on one rank
    keys = [k for k in [j % kv for j in range(kv * copies)] for _ in range(served)]
    # The c-th copy of a head (in tile order) serves slice c of its group: copy c of every head
    # comes before copy c + 1, and fills kv / kv_per_rank ranks.
    shifts = [s for s in range(0, group, served) for _ in range(kv // kv_per_rank * per_rank)]
    order = []
    for position in range(tp * per_rank):
        slot = position % served
        order.append(slot + keys[position] * group + shifts[position])
    return order


def inverse(order: list[int]) -> list[int]:
    out = [0] * len(order)
    for physical, canonical in enumerate(order):
        out[canonical] = physical
    return out


def named_layout(spec: GQAQKV) -> GQAQKV:
    """``spec`` named ``tile`` where its arrangement is also the tiled one (one KV head, or no
    replicas): Optimum Neuron's reader knows only that name."""
    tiled = dataclasses.replace(spec, kv_layout=TILE)
    if spec.kv_layout != TILE and query_order(tiled) == query_order(spec) and kv_order(tiled) == kv_order(spec):
        return tiled
    return spec
