"""NxD shards as canonical Hugging Face tensors, assembled one weight at a time.

:func:`plan` checks every rank file against the metadata (same keys, dtypes and shard shapes on
every rank, as many ranks as the metadata's partitions, spec sizes that match the tensors) and
returns the outputs in order, each with its shape, dtype and a ``build()`` that reads only the
rank slices it needs: with memory-mapped rank files, one full weight is in memory at a time.

The transforms, exactly as Optimum Neuron reverses them:

- a partitioned parameter: the rank shards concatenated along ``partition_dim``; with a stride
  s, rank r's shard is s chunks, the c-th chunk of the whole being chunk ``c // tp`` of rank
  ``c % tp`` (NxD's ``create_local_weight``);
- ``FusedLinearsSpec``: each rank's shard split into the linears' per-rank sizes along
  ``fuse_axis``, each linear concatenated over ranks (gate_up's stride 2, q/k/v's stride 3);
- ``GQAQKVColumnParallelLinearSpec``: q, k, v cut from each rank's rows (fused or not),
  concatenated; query heads (and ``o_proj``'s input columns) put back in Hugging Face order; of
  the replicated KV heads, the first copy of each kept and every other copy checked equal to it
  bitwise (a layout named wrongly would compare different heads and fail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from crosschip.checkpoint.nxd.files import NxdCheckpoint
from crosschip.checkpoint.nxd.heads import inverse, kv_order, query_order
from crosschip.checkpoint.nxd.metadata import FusedLinears, GQAQKV, Metadata, Partition
from crosschip.errors import CheckpointError


@dataclass
class Output:
    name: str
    shape: tuple
    dtype: torch.dtype
    build: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan(checkpoint: NxdCheckpoint, metadata: dict[int, Metadata], tied_embeddings: bool = False) -> list[Output]:
    outputs: list[Output] = []
    for pp in range(checkpoint.pp):
        outputs += _plan_stage(checkpoint, pp, metadata[pp], tied_embeddings)
    names = [o.name for o in outputs]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise CheckpointError(f"{checkpoint.tag_dir}: more than one stage or spec produces {duplicate[:3]}")
    return outputs


class _Stage:
    """The rank states of one pipeline stage, with the checks every read relies on."""

    def __init__(self, checkpoint: NxdCheckpoint, pp: int, meta: Metadata):
        self.tp, self.meta = checkpoint.tp, meta
        self.ranks = [checkpoint.tensors(pp, t) for t in range(checkpoint.tp)]
        self.names = self.ranks[0].keys()
        for rank, state in enumerate(self.ranks[1:], start=1):
            if set(state.keys()) != set(self.names):
                diff = sorted(set(state.keys()) ^ set(self.names))[:3]
                raise CheckpointError(f"{state.path}: holds other parameters than {self.ranks[0].path.name} "
                                      f"(differing: {diff}): the rank files are not one save")
        self.shapes, self.dtypes = {}, {}
        for name in self.names:
            tensors = [state.get(name) for state in self.ranks]
            shapes = {tuple(t.shape) for t in tensors}
            dtypes = {t.dtype for t in tensors}
            if len(shapes) > 1 or len(dtypes) > 1:
                raise CheckpointError(
                    f"{self.ranks[0].path.parent}: {name!r} has shards of shapes {[tuple(t.shape) for t in tensors]} "
                    f"and dtypes {[str(t.dtype) for t in tensors]} on ranks 0..{self.tp - 1}: NxD shards are equal, "
                    "so these files come from saves at different tp degrees (or are corrupt)")
            self.shapes[name], self.dtypes[name] = shapes.pop(), dtypes.pop()
            del tensors

    def shards(self, name: str) -> list[torch.Tensor]:
        return [state.get(name) for state in self.ranks]

    def where(self, name: str) -> str:
        return f"{self.ranks[0].path.parent}: {name!r}"


def _plan_stage(checkpoint: NxdCheckpoint, pp: int, meta: Metadata, tied: bool) -> list[Output]:
    stage = _Stage(checkpoint, pp, meta)
    handled: dict[str, list[Output]] = {}  # physical name -> the outputs placed where it was
    owned: set[str] = set()
    for spec in meta.specs:
        if spec.tp != stage.tp:
            raise CheckpointError(f"{meta.source}: {type(spec).__name__} of {spec.module} was saved at tp={spec.tp}, "
                                  f"but {stage.tp} rank files are present: ranks of different saves")
        names, placed = (_gqa if isinstance(spec, GQAQKV) else _fused)(stage, spec)
        handled.update(placed)
        owned.update(names)
    outputs: list[Output] = []
    for name in stage.names:
        if name in handled:
            outputs += handled[name]
        elif name in owned:
            continue
        elif name in meta.parameters:
            outputs.append(_plain(stage, name, meta.parameters[name]))
        elif tied and name == "lm_head.weight":
            continue  # a tied LM head is the embedding: Hugging Face checkpoints leave it out
        else:
            raise CheckpointError(f"{stage.where(name)} is in the rank files but not in {meta.source}: the metadata "
                                  "does not describe these tensors")
    extra = sorted(set(meta.parameters) - set(stage.names) - owned)
    if extra:
        raise CheckpointError(f"{meta.source}: lists {extra[:3]}, which no rank file of pp stage {pp} holds")
    return outputs


def _plain(stage: _Stage, name: str, part: Partition) -> Output:
    shape, dtype = stage.shapes[name], stage.dtypes[name]
    if part.dim is None:
        return Output(name, shape, dtype, lambda: stage.ranks[0].get(name).clone())
    _check_partitions(stage, name, part)
    full = list(shape)
    full[part.dim] *= stage.tp
    if shape[part.dim] % part.stride:
        raise CheckpointError(f"{stage.where(name)}: a shard of {shape[part.dim]} along dim {part.dim} cannot hold "
                              f"partition_stride {part.stride} equal chunks")
    return Output(name, tuple(full), dtype, lambda: unshard(stage.shards(name), part.dim, part.stride))


def _check_partitions(stage: _Stage, name: str, part: Partition) -> None:
    if part.partitions != stage.tp:
        raise CheckpointError(f"{stage.where(name)}: the metadata says it was split into {part.partitions} "
                              f"partitions, but {stage.tp} rank files are present: ranks of different saves")
    if part.dim >= len(stage.shapes[name]):
        raise CheckpointError(f"{stage.where(name)}: partition_dim {part.dim} for a tensor of shape "
                              f"{stage.shapes[name]}")


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The whole tensor from NxD's rank shards (inverse of ``create_local_weight``)."""
    tp = len(shards)
    chunks = [s.chunk(stride, dim) for s in shards]
    return torch.cat([chunks[c % tp][c // tp] for c in range(tp * stride)], dim)


def _fused(stage: _Stage, spec: FusedLinears):
    names, placed = [], {}
    for param in ("weight", "bias") if spec.bias else ("weight",):
        fused = f"{spec.module}.{spec.fused}.{param}"
        if fused not in stage.shapes:
            raise CheckpointError(f"{stage.meta.source}: FusedLinearsSpec names {fused!r}, which the rank files do "
                                  "not hold")
        names.append(fused)
        part = stage.meta.parameters.get(fused) or Partition(0, 1, stage.tp)
        dim = part.dim if part.dim is not None else 0
        shape = stage.shapes[fused]
        axis = spec.axis if len(shape) > 1 else 0
        sizes = [d // stage.tp for d in spec.dims]
        if sum(sizes) != shape[axis] or any(d % stage.tp for d in spec.dims):
            raise CheckpointError(f"{stage.where(fused)}: FusedLinearsSpec expects {spec.dims} split over "
                                  f"tp={stage.tp} ({sizes} per rank) along dim {axis}, the shards have {shape[axis]}")
        placed[fused] = []
        for i, linear in enumerate(spec.linears):
            out_shape = list(shape)
            out_shape[axis] = sizes[i]
            out_shape[dim] *= stage.tp
            placed[fused].append(Output(f"{spec.module}.{linear}.{param}", tuple(out_shape), stage.dtypes[fused],
                                        _split_and_cat(stage, fused, sizes, axis, dim, i)))
    return names, placed


def _split_and_cat(stage, fused, sizes, axis, dim, i):
    return lambda: torch.cat([s.split(sizes, axis)[i] for s in stage.shards(fused)], dim)


def _gqa(stage: _Stage, spec: GQAQKV):
    names, placed = [], {}
    qorder, korder = query_order(spec), kv_order(spec)
    d = spec.head_dim
    for param in ("weight", "bias") if spec.bias else ("weight",):
        base = f"{spec.module}.{spec.qkv}.{param}"
        pieces = {"qkv": (base + "_qkv",)} if spec.fused else {"qkv": tuple(f"{base}_{r}" for r in "qkv")}
        for name in pieces["qkv"]:
            if name not in stage.shapes:
                raise CheckpointError(f"{stage.meta.source}: GQAQKVColumnParallelLinearSpec of {spec.module} names "
                                      f"{name!r}, which the rank files do not hold")
        names += list(pieces["qkv"])
        outputs = placed[pieces["qkv"][0]] = []
        rows = {"q": spec.q_rows, "k": spec.kv_rows, "v": spec.kv_rows}
        for role in "qkv":
            name, start = (pieces["qkv"][0], {"q": 0, "k": spec.q_rows, "v": spec.q_rows + spec.kv_rows}[role]) \
                if spec.fused else (f"{base}_{role}", 0)
            have = stage.shapes[name][0]
            want = spec.q_rows + 2 * spec.kv_rows if spec.fused else rows[role]
            if have != want:
                raise CheckpointError(f"{stage.where(name)}: the GQA spec expects {want} rows per rank "
                                      f"({spec.heads} query heads, {spec.kv_heads} KV heads x {spec.copies} copies, "
                                      f"tp={spec.tp}), the rank files hold {have}")
            shape = (rows[role] * spec.tp // (1 if role == "q" else spec.copies),) + stage.shapes[name][1:]
            target = f"{spec.module}.{getattr(spec, role)}.{param}"
            build = (_queries(stage, name, start, rows["q"], d, qorder) if role == "q"
                     else _kv_heads(stage, name, start, rows[role], d, korder, target))
            outputs.append(Output(target, shape, stage.dtypes[name], build))
    o_name = f"{spec.module}.{spec.o}.weight"
    if o_name not in stage.shapes:
        raise CheckpointError(f"{stage.meta.source}: the GQA spec of {spec.module} has no {o_name!r} in the rank files")
    part = stage.meta.parameters.get(o_name, Partition(1, 1, stage.tp))
    if part.dim != 1:
        raise CheckpointError(f"{stage.where(o_name)}: the metadata partitions it on dim {part.dim}; an o_proj "
                              "after a GQA QKV layer is row-parallel (dim 1)")
    _check_partitions(stage, o_name, part)
    o_shape = (stage.shapes[o_name][0], stage.shapes[o_name][1] * stage.tp)
    placed[o_name] = [Output(o_name, o_shape, stage.dtypes[o_name], _o_columns(stage, o_name, d, qorder))]
    return names + [o_name], placed


def _queries(stage, name, start, rows, d, order):
    def build():
        physical = torch.cat([s[start:start + rows] for s in stage.shards(name)], 0)
        heads = physical.unflatten(0, (-1, d))
        return heads[inverse(order)].flatten(0, 1)
    return build


def _kv_heads(stage, name, start, rows, d, order, target):
    def build():
        physical = torch.cat([s[start:start + rows] for s in stage.shards(name)], 0).unflatten(0, (-1, d))
        first = {}
        for j, head in enumerate(order):
            if head not in first:
                first[head] = j
            elif not torch.equal(physical[j], physical[first[head]]):
                raise CheckpointError(
                    f"{stage.where(name)}: the copies of KV head {head} (physical heads {first[head]} and {j}) differ: "
                    "the KV layout does not match the one these weights were saved with (tile or interleave), or the "
                    f"replicas drifted apart in training; {target} cannot be consolidated")
        return physical[[first[h] for h in range(len(first))]].flatten(0, 1)
    return build


def _o_columns(stage, name, d, order):
    def build():
        physical = torch.cat(stage.shards(name), 1).unflatten(1, (-1, d))
        return physical[:, inverse(order)].flatten(1, 2)
    return build
