"""Weight layouts: pure tensor transforms and reversible dict transforms built from them.

The canonical layout of a component is a dict of *role* names (``q.weight``, ``gate.weight``,
``norm.weight``...) holding tensors exactly as Hugging Face stores them. A backend's physical
layout is whatever its module's ``state_dict`` holds. A :class:`Transform` maps canonical ->
physical (``apply``) and back (``invert``); every transform here is exactly invertible, so a
round trip is bitwise identical. Keys a transform does not name pass through unchanged, so
transforms compose with :class:`Chain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

Tensors = dict[str, torch.Tensor]


# -- pure tensor functions --------------------------------------------------------------------
def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[Q_g0 | K_0 | V_0 | Q_g1 | K_1 | V_1 | ...]`` along dim 0: for each KV head g, the query
    heads of its group, then K head g, then V head g. Works for weights and biases alike, and a
    dim-0 shard over a divisor of ``num_kv_heads`` holds whole groups."""
    rest = q.shape[1:]
    groups = [t.reshape(num_kv_heads, -1, *rest) for t in (q, k, v)]
    return torch.cat(groups, dim=1).reshape(-1, *rest).contiguous()


def split_qkv(combined: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of :func:`interleave_qkv`: returns ``(q, k, v)``."""
    rest = combined.shape[1:]
    group_rows = (num_heads // num_kv_heads) * head_dim
    expected = num_kv_heads * (group_rows + 2 * head_dim)
    if combined.shape[0] != expected:
        raise ValueError(f"combined QKV has {combined.shape[0]} rows, expected {expected} "
                         f"({num_heads} heads, {num_kv_heads} KV heads, head_dim {head_dim})")
    grouped = combined.reshape(num_kv_heads, group_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([group_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def split_grouped_heads(out: torch.Tensor, group_size: int, head_dim: int):
    """The output of a projection whose rows are :func:`interleave_qkv`-grouped, ``[..., rows]``,
    as ``q [..., heads, head_dim]`` and ``k``, ``v [..., kv_heads, head_dim]`` (views where
    possible). Head counts follow from the width, so a column shard of whole groups (one
    tensor-parallel rank's) splits into its own heads unchanged."""
    width = (group_size + 2) * head_dim
    grouped = out.view(*out.shape[:-1], out.shape[-1] // width, width)
    q, k, v = grouped.split([group_size * head_dim, head_dim, head_dim], dim=-1)
    return q.reshape(*out.shape[:-1], -1, head_dim), k, v


def interleave_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[a_0, b_0, a_1, b_1, ...]`` along dim 0 (gate/up pairs stay together under sharding)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot interleave rows of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.stack([a, b], dim=1).reshape(-1, *a.shape[1:]).contiguous()


def deinterleave_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] % 2:
        raise ValueError(f"cannot de-interleave {x.shape[0]} rows into two halves")
    pairs = x.reshape(-1, 2, *x.shape[1:])
    return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def interleave_blocks(a: torch.Tensor, b: torch.Tensor, blocks: int) -> torch.Tensor:
    """``[a_0; b_0; a_1; b_1; ...]`` along dim 0, ``a_r`` and ``b_r`` the r-th of ``blocks`` equal
    row blocks. A dim-0 shard over ``blocks`` ranks then holds ``[a_r; b_r]``: the layout of a
    fused projection that each rank splits in halves locally (Transformer Engine's SwiGLU fc1
    under tensor parallelism, neuronx-distributed's ``stride=2``). ``blocks=1`` is a plain
    concatenation; one block per row is :func:`interleave_rows`."""
    if a.shape != b.shape:
        raise ValueError(f"cannot interleave blocks of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if blocks < 1 or a.shape[0] % blocks:
        raise ValueError(f"cannot cut {a.shape[0]} rows into {blocks} equal blocks")
    rest = a.shape[1:]
    pair = torch.stack([a.reshape(blocks, -1, *rest), b.reshape(blocks, -1, *rest)], dim=1)
    return pair.reshape(-1, *rest).contiguous()


def deinterleave_blocks(x: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_blocks`."""
    if blocks < 1 or x.shape[0] % (2 * blocks):
        raise ValueError(f"cannot cut {x.shape[0]} rows into {blocks} pairs of equal blocks")
    pairs = x.reshape(blocks, 2, -1, *x.shape[1:])
    rest = x.shape[1:]
    return pairs[:, 0].reshape(-1, *rest).contiguous(), pairs[:, 1].reshape(-1, *rest).contiguous()


def replicate_heads(x: torch.Tensor, num_heads: int, copies: int) -> torch.Tensor:
    """Each of ``num_heads`` heads along dim 0 repeated ``copies`` times in place:
    ``[h_0, h_0, h_1, h_1, ...]`` for two copies. Query heads of a group map to the replicas of
    their KV head in this order, so the replicated model computes exactly the same function."""
    rest = x.shape[1:]
    return x.reshape(num_heads, -1, *rest).repeat_interleave(copies, dim=0).reshape(-1, *rest).contiguous()


def first_replica(x: torch.Tensor, num_heads: int, copies: int) -> torch.Tensor:
    """Inverse of :func:`replicate_heads`: the first copy of each head."""
    rest = x.shape[1:]
    if x.shape[0] % (num_heads * copies):
        raise ValueError(f"cannot take {num_heads} heads from {copies} replicas of {x.shape[0]} rows")
    return x.reshape(num_heads, copies, -1, *rest)[:, 0].reshape(-1, *rest).contiguous()


def gather_heads(x: torch.Tensor, order, num_heads: int, dim: int = 0) -> torch.Tensor:
    """The ``num_heads`` equal heads of ``x`` along ``dim`` taken in ``order``, which may repeat
    a head (a replica) or permute them."""
    if x.shape[dim] % num_heads:
        raise ValueError(f"cannot cut {x.shape[dim]} rows of dim {dim} into {num_heads} equal heads")
    index = torch.tensor(order, dtype=torch.long, device=x.device)
    moved = x.movedim(dim, 0)
    picked = moved.reshape(num_heads, -1, *moved.shape[1:]).index_select(0, index)
    return picked.reshape(-1, *moved.shape[1:]).movedim(0, dim).contiguous()


def first_of_heads(x: torch.Tensor, order, num_heads: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`gather_heads`: each of the ``num_heads`` heads from the first position
    of ``order`` holding it (every head must be there)."""
    first = {}
    for position, head in enumerate(order):
        first.setdefault(head, position)
    missing = [h for h in range(num_heads) if h not in first]
    if missing:
        raise ValueError(f"head order {list(order)} holds no copy of head(s) {missing}")
    return gather_heads(x, [first[h] for h in range(num_heads)], len(order), dim)


def block_concat(tensors, blocks: int) -> torch.Tensor:
    """``[t0_0; t1_0; ...; t0_1; t1_1; ...]`` along dim 0: each tensor cut into ``blocks`` equal
    row blocks, block r of every tensor side by side. A dim-0 shard over ``blocks`` ranks then
    holds ``[t0_r; t1_r; ...]`` (neuronx-distributed's fused ``weight_qkv``: ``[Q_r; K_r; V_r]``)."""
    for t in tensors:
        if t.shape[0] % blocks:
            raise ValueError(f"cannot cut {t.shape[0]} rows into {blocks} equal blocks")
    parts = [t.reshape(blocks, -1, *t.shape[1:]) for t in tensors]
    return torch.cat(parts, dim=1).reshape(-1, *tensors[0].shape[1:]).contiguous()


def block_split(x: torch.Tensor, rows, blocks: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`block_concat` for tensors of ``rows`` rows each."""
    if sum(rows) != x.shape[0] or any(r % blocks for r in rows):
        raise ValueError(f"cannot split {x.shape[0]} rows into {blocks} blocks of {list(rows)} rows")
    per_block = x.reshape(blocks, -1, *x.shape[1:]).split([r // blocks for r in rows], dim=1)
    return tuple(t.reshape(-1, *x.shape[1:]).contiguous() for t in per_block)


def concat(tensors, dim: int = 0) -> torch.Tensor:
    return torch.cat(list(tensors), dim=dim).contiguous()


def split(x: torch.Tensor, sizes, dim: int = 0) -> tuple[torch.Tensor, ...]:
    if sum(sizes) != x.shape[dim]:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} into {list(sizes)}")
    return tuple(t.contiguous() for t in x.split(list(sizes), dim=dim))


# -- reversible dict transforms ---------------------------------------------------------------
class Transform:
    """Canonical -> physical (``apply``) and physical -> canonical (``invert``)."""

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        raise NotImplementedError

    def invert(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        raise NotImplementedError


def _take(tensors: Mapping[str, torch.Tensor], names, what: str):
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"{what} needs {', '.join(names)}; missing {', '.join(missing)}")
    rest = {k: v for k, v in tensors.items() if k not in names}
    return [tensors[n] for n in names], rest


@dataclass(frozen=True)
class Rename(Transform):
    mapping: tuple[tuple[str, str], ...]  # (canonical, physical)

    @classmethod
    def of(cls, **mapping: str) -> "Rename":
        return cls(tuple(mapping.items()))

    def apply(self, tensors):
        names = dict(self.mapping)
        return {names.get(k, k): v for k, v in tensors.items()}

    def invert(self, tensors):
        names = {p: c for c, p in self.mapping}
        return {names.get(k, k): v for k, v in tensors.items()}


@dataclass(frozen=True)
class Concat(Transform):
    """Several canonical tensors concatenated into one physical tensor, split back by size."""

    sources: tuple[str, ...]
    target: str
    sizes: tuple[int, ...]
    dim: int = 0

    def apply(self, tensors):
        if not any(s in tensors for s in self.sources):
            return dict(tensors)
        parts, rest = _take(tensors, self.sources, f"concat into {self.target}")
        return {**rest, self.target: concat(parts, self.dim)}

    def invert(self, tensors):
        if self.target not in tensors:
            return dict(tensors)
        [whole], rest = _take(tensors, [self.target], "split")
        return {**rest, **dict(zip(self.sources, split(whole, self.sizes, self.dim)))}


@dataclass(frozen=True)
class InterleaveQKV(Transform):
    """q, k, v -> one tensor in the grouped ``[Q_g | K_g | V_g]`` order of :func:`interleave_qkv`."""

    q: str
    k: str
    v: str
    target: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def apply(self, tensors):
        if self.q not in tensors:
            return dict(tensors)
        (q, k, v), rest = _take(tensors, [self.q, self.k, self.v], f"QKV interleave into {self.target}")
        return {**rest, self.target: interleave_qkv(q, k, v, self.num_kv_heads)}

    def invert(self, tensors):
        if self.target not in tensors:
            return dict(tensors)
        [combined], rest = _take(tensors, [self.target], "QKV split")
        q, k, v = split_qkv(combined, self.num_heads, self.num_kv_heads, self.head_dim)
        return {**rest, self.q: q, self.k: k, self.v: v}


@dataclass(frozen=True)
class InterleaveRows(Transform):
    """a, b -> rows ``[a_0, b_0, a_1, b_1, ...]`` (the torch backend's gate/up layout)."""

    a: str
    b: str
    target: str

    def apply(self, tensors):
        if self.a not in tensors:
            return dict(tensors)
        (a, b), rest = _take(tensors, [self.a, self.b], f"row interleave into {self.target}")
        return {**rest, self.target: interleave_rows(a, b)}

    def invert(self, tensors):
        if self.target not in tensors:
            return dict(tensors)
        [x], rest = _take(tensors, [self.target], "row de-interleave")
        a, b = deinterleave_rows(x)
        return {**rest, self.a: a, self.b: b}


@dataclass(frozen=True)
class InterleaveBlocks(Transform):
    """a, b -> ``[a_0; b_0; a_1; b_1; ...]`` in ``blocks`` row blocks (:func:`interleave_blocks`)."""

    a: str
    b: str
    target: str
    blocks: int = 1

    def apply(self, tensors):
        if self.a not in tensors:
            return dict(tensors)
        (a, b), rest = _take(tensors, [self.a, self.b], f"block interleave into {self.target}")
        return {**rest, self.target: interleave_blocks(a, b, self.blocks)}

    def invert(self, tensors):
        if self.target not in tensors:
            return dict(tensors)
        [x], rest = _take(tensors, [self.target], "block de-interleave")
        a, b = deinterleave_blocks(x, self.blocks)
        return {**rest, self.a: a, self.b: b}


@dataclass(frozen=True)
class ReplicateHeads(Transform):
    """Replicate every head of the named tensors ``copies`` times (KV heads when the TP degree
    exceeds them, so each rank holds whole groups); the inverse keeps the first replica. A
    round trip from canonical is bitwise; the replicas' gradients must be summed by whoever
    trains the replicated weights, or they drift apart."""

    names: tuple[str, ...]
    num_heads: int
    copies: int

    def apply(self, tensors):
        return {k: replicate_heads(v, self.num_heads, self.copies) if k in self.names else v
                for k, v in tensors.items()}

    def invert(self, tensors):
        return {k: first_replica(v, self.num_heads, self.copies) if k in self.names else v
                for k, v in tensors.items()}


@dataclass(frozen=True)
class GatherHeads(Transform):
    """The heads of the named tensors along ``dim`` taken in ``order`` (:func:`gather_heads`):
    a permutation, a replication, or both; the inverse keeps each head's first copy. ``label``
    names the arrangement (it appears in the transform's repr, which training states record)."""

    names: tuple[str, ...]
    order: tuple[int, ...]
    num_heads: int
    dim: int = 0
    label: str = ""

    def apply(self, tensors):
        return {k: gather_heads(v, self.order, self.num_heads, self.dim) if k in self.names else v
                for k, v in tensors.items()}

    def invert(self, tensors):
        return {k: first_of_heads(v, self.order, self.num_heads, self.dim) if k in self.names else v
                for k, v in tensors.items()}


@dataclass(frozen=True)
class BlockConcat(Transform):
    """Several tensors -> one, ``blocks`` row blocks of each side by side (:func:`block_concat`)."""

    sources: tuple[str, ...]
    target: str
    rows: tuple[int, ...]
    blocks: int = 1

    def apply(self, tensors):
        if not any(s in tensors for s in self.sources):
            return dict(tensors)
        parts, rest = _take(tensors, self.sources, f"block concat into {self.target}")
        return {**rest, self.target: block_concat(parts, self.blocks)}

    def invert(self, tensors):
        if self.target not in tensors:
            return dict(tensors)
        [x], rest = _take(tensors, [self.target], "block split")
        return {**rest, **dict(zip(self.sources, block_split(x, self.rows, self.blocks)))}


@dataclass(frozen=True)
class Stack(Transform):
    """Several tensors of one shape -> one, stacked on a new dim 0 (a mixture of experts' per-expert
    weights as one ``[experts, ...]`` tensor); the inverse takes them apart again."""

    sources: tuple[str, ...]
    target: str

    def apply(self, tensors):
        if not any(s in tensors for s in self.sources):
            return dict(tensors)
        parts, rest = _take(tensors, self.sources, f"stack into {self.target}")
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack {self.sources[0]}... into {self.target}: shapes {sorted(shapes)} differ")
        return {**rest, self.target: torch.stack(parts).contiguous()}

    def invert(self, tensors):
        if self.target not in tensors:
            return dict(tensors)
        [whole], rest = _take(tensors, [self.target], "unstack")
        if whole.shape[0] != len(self.sources):
            raise ValueError(f"{self.target} holds {whole.shape[0]} entries, expected {len(self.sources)}")
        return {**rest, **{name: part.contiguous() for name, part in zip(self.sources, whole.unbind(0))}}


@dataclass(frozen=True)
class Chain(Transform):
    steps: tuple[Transform, ...] = ()

    @classmethod
    def of(cls, *steps: Transform) -> "Chain":
        return cls(tuple(steps))

    def apply(self, tensors):
        out = dict(tensors)
        for step in self.steps:
            out = step.apply(out)
        return out

    def invert(self, tensors):
        out = dict(tensors)
        for step in reversed(self.steps):
            out = step.invert(out)
        return out


IDENTITY = Chain()


def grouped_qkv(spec, tp: int, weight: str, bias: str) -> list[Transform]:
    """q, k, v (weights and biases) into one ``[Q_g | K_g | V_g]``-grouped projection, the layout
    of every backend whose QKV projection is column-parallel: a dim-0 shard holds whole groups.
    Where ``tp`` exceeds the KV heads each is first replicated (see
    :mod:`crosschip.parallel.kv_replication`), so that each rank still gets one whole group."""
    from crosschip.parallel.kv_replication import kv_copies

    copies = kv_copies(spec, tp)
    replicate = [ReplicateHeads(("k.weight", "v.weight", "k.bias", "v.bias"), spec.num_kv_heads, copies)]
    heads = (spec.num_heads, spec.num_kv_heads * copies, spec.head_dim)
    return [*(replicate if copies > 1 else []),
            InterleaveQKV("q.weight", "k.weight", "v.weight", weight, *heads),
            InterleaveQKV("q.bias", "k.bias", "v.bias", bias, *heads)]


# -- canonical roles of each component ---------------------------------------------------------
def canonical_shapes(component: str, spec, fuses_input_norm: bool = False,
                     registry=None) -> dict[str, tuple[int, ...]]:
    """Role name -> Hugging Face shape of every weight a component holds (global, unsharded): the
    kind's own (:attr:`crosschip.components.ComponentKind.weights`), plus ``norm.*`` for an
    input norm the component's backend fused in."""
    from crosschip.plugins.registry import get_registry

    kind = (registry or get_registry()).kind
    shapes = dict(kind(component).weights(spec))
    norm = getattr(spec, "input_norm", None)
    if fuses_input_norm and norm is not None:
        from crosschip.specs import LayerNormSpec

        norm_kind = kind("layer_norm" if isinstance(norm, LayerNormSpec) else "rms_norm")
        shapes.update({f"norm.{role}": shape for role, shape in norm_kind.weights(norm).items()})
    return shapes
