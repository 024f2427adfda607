"""Canonical Hugging Face tensors as NxD rank shards, in the layout Optimum Neuron's Llama builds
at a given tp, with the metadata that lets Optimum Neuron (or :mod:`.consolidate`) reverse it.

Module choices, as Optimum Neuron makes them: a GQA QKV layer (``qkv_proj.weight_q/k/v``, or
``weight_qkv`` with ``fuse_qkv``) where tp does not divide the KV heads, KV heads then replicated
``tp // kv_heads`` times (tiled unless ``kv_layout="interleave"``); otherwise separate
column-parallel ``q_proj``/``k_proj``/``v_proj`` (or one stride-3 ``qkv_proj`` with ``fuse_qkv``
when there are as many KV heads as query heads); ``gate_up_proj`` with stride 2; row-parallel
``o_proj``/``down_proj``; vocab-parallel ``embed_tokens`` and ``lm_head``.

A rank's shard is assembled from slices of the canonical tensors (``get_slice``), one rank at a
time: the memory held is one rank's share of the model.
"""

from __future__ import annotations

import torch

from crosschip.checkpoint.nxd.heads import kv_order, named_layout, query_order
from crosschip.checkpoint.nxd.metadata import TILE, FusedLinears, GQAQKV, Metadata, Partition, partition_of, check_gqa
from crosschip.errors import CheckpointError


def layout(config, names: list[str], tp: int, kv_layout: str = TILE, fuse_qkv: bool = False) -> tuple[Metadata, list[str]]:
    """The metadata of the shards of canonical ``names`` at ``tp``, and the physical names in
    order (each spec's names where its first canonical name was)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    meta = Metadata(source="written by crosschip, in Optimum Neuron's format")
    fused = [n for n in names if ".self_attn.qkv_proj." in n or ".mlp.gate_up_proj." in n]
    if fused:
        raise CheckpointError(f"{fused[0]}: this checkpoint's own projections are fused (as Phi-3's); the NxD layout "
                              "is defined for Hugging Face's separate q/k/v and gate/up projections")
    physical: list[str] = []
    for name in names:
        module, _, leaf = name.rpartition(".")
        parent, _, linear = module.rpartition(".")
        if linear in ("q_proj", "k_proj", "v_proj") and parent.endswith(".self_attn"):
            if linear != "q_proj":
                continue  # placed with q_proj
            bias = f"{parent}.q_proj.bias" in names
            if leaf == "bias":
                continue
            gqa = kv < tp or kv % tp != 0
            if gqa:
                copies = max(1, tp // kv)
                spec = GQAQKV(parent, "qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", heads, kv, copies,
                              heads // tp * head_dim, kv * copies // tp * head_dim, fuse_qkv, bias, tp,
                              kv_layout if copies > 1 else TILE)
                check_gqa(spec, f"{parent} at tp={tp}")
                spec = named_layout(spec)
                meta.specs.append(spec)
                for p in ("weight", "bias") if bias else ("weight",):
                    for piece in ("qkv",) if fuse_qkv else ("q", "k", "v"):
                        physical.append(f"{parent}.qkv_proj.{p}_{piece}")
                        meta.parameters[physical[-1]] = Partition(0, 1, tp)
            elif fuse_qkv and kv == heads:
                meta.specs.append(FusedLinears(parent, "qkv_proj", ("q_proj", "k_proj", "v_proj"), bias, 0,
                                               (heads * head_dim,) * 3, tp))
                for p in ("weight", "bias") if bias else ("weight",):
                    physical.append(f"{parent}.qkv_proj.{p}")
                    meta.parameters[physical[-1]] = Partition(0, 3, tp)
            else:
                for p in ("weight", "bias") if bias else ("weight",):
                    for proj in ("q_proj", "k_proj", "v_proj"):
                        physical.append(f"{parent}.{proj}.{p}")
                        meta.parameters[physical[-1]] = partition_of(physical[-1], tp)
        elif linear in ("gate_proj", "up_proj") and parent.endswith(".mlp"):
            if linear != "gate_proj" or (leaf == "bias" and f"{parent}.gate_proj.weight" in names):
                continue
            bias = f"{parent}.gate_proj.bias" in names
            meta.specs.append(FusedLinears(parent, "gate_up_proj", ("gate_proj", "up_proj"), bias, 0,
                                           (config.intermediate_size,) * 2, tp))
            for p in ("weight", "bias") if bias else ("weight",):
                physical.append(f"{parent}.gate_up_proj.{p}")
                meta.parameters[physical[-1]] = Partition(0, 2, tp)
        else:
            physical.append(name)
            meta.parameters[name] = partition_of(name, tp)
    return meta, physical


def rank_state(source, meta: Metadata, names: list[str], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s shard of every physical name, read from ``source`` (``shape``, ``get``,
    ``get_slice`` by canonical name: a :class:`~crosschip.checkpoint.SafetensorsCheckpoint`)."""
    made: dict[str, torch.Tensor] = {}
    for spec in meta.specs:
        made.update(_gqa_shard(source, spec, rank) if isinstance(spec, GQAQKV) else _fused_shard(source, spec, rank))
    out = {}
    for name in names:
        if name in made:
            out[name] = made.pop(name)
            continue
        part = meta.parameters[name]
        if name in _o_projections(meta):
            out[name] = _o_shard(source, _o_projections(meta)[name], rank)
        elif part.dim is None:
            out[name] = source.get(name).clone()
        else:
            out[name] = shard(source, name, part.dim, tp, rank, part.stride)
    return out


def shard(source, name: str, dim: int, tp: int, rank: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of canonical ``name`` (NxD's ``create_local_weight``): with stride
    s, chunks ``rank, rank + tp, ...`` of the whole cut into ``tp * s``."""
    size = source.shape(name)[dim]
    if size % (tp * stride):
        raise CheckpointError(f"{name}: size {size} along dim {dim} does not split into tp={tp} x stride {stride} "
                              "equal chunks")
    step = size // (tp * stride)
    pieces = [source.get_slice(name, _along(dim, slice(c * step, (c + 1) * step)))
              for c in range(rank, tp * stride, tp)]
    return torch.cat(pieces, dim).contiguous()


def _along(dim: int, s: slice) -> tuple:
    return (slice(None),) * dim + (s,)


def _fused_shard(source, spec: FusedLinears, rank: int) -> dict:
    out = {}
    for param in ("weight", "bias") if spec.bias else ("weight",):
        parts = [shard(source, f"{spec.module}.{linear}.{param}", 0, spec.tp, rank) for linear in spec.linears]
        out[f"{spec.module}.{spec.fused}.{param}"] = torch.cat(parts, spec.axis if parts[0].dim() > 1 else 0)
    return out


def _heads(source, name: str, heads: list[int], d: int) -> torch.Tensor:
    return torch.cat([source.get_slice(name, (slice(h * d, (h + 1) * d),)) for h in heads], 0)


def _gqa_shard(source, spec: GQAQKV, rank: int) -> dict:
    d = spec.head_dim
    per_q, per_kv = spec.q_rows // d, spec.kv_rows // d
    queries = query_order(spec)[rank * per_q:(rank + 1) * per_q]
    kvs = kv_order(spec)[rank * per_kv:(rank + 1) * per_kv]
    out = {}
    for param in ("weight", "bias") if spec.bias else ("weight",):
        q = _heads(source, f"{spec.module}.{spec.q}.{param}", queries, d)
        k = _heads(source, f"{spec.module}.{spec.k}.{param}", kvs, d)
        v = _heads(source, f"{spec.module}.{spec.v}.{param}", kvs, d)
        base = f"{spec.module}.{spec.qkv}.{param}"
        if spec.fused:
            out[f"{base}_qkv"] = torch.cat([q, k, v], 0)
        else:
            out.update({f"{base}_q": q, f"{base}_k": k, f"{base}_v": v})
    return out


def _o_projections(meta: Metadata) -> dict:
    return {f"{s.module}.{s.o}.weight": s for s in meta.specs if isinstance(s, GQAQKV)}


def _o_shard(source, spec: GQAQKV, rank: int) -> torch.Tensor:
    d = spec.head_dim
    per_q = spec.q_rows // d
    heads = query_order(spec)[rank * per_q:(rank + 1) * per_q]
    name = f"{spec.module}.{spec.o}.weight"
    return torch.cat([source.get_slice(name, (slice(None), slice(h * d, (h + 1) * d))) for h in heads], 1)
