"""The neuron backend's weights as an NxD sharded checkpoint: this rank's parameters under their
own names (the names Optimum Neuron's Llama gives the same NxD layers: ``qkv_proj.weight_qkv``,
``gate_up_proj.weight``, ...) and the consolidation metadata Optimum Neuron writes beside them,
built from the model's components, so that crosschip's consolidation and Optimum Neuron's both
turn the shards back into Hugging Face weights.

The metadata's KV-head arrangement is the one this backend built for its platform (see
:mod:`crosschip_neuron.layout`): tiled on trn1 (Optimum's own), adjacent copies on trn2, marked
``interleave``. Before writing it, the query and KV orders it implies are checked against the
ones the model was built with, so metadata that would consolidate wrongly is never written.
"""

from __future__ import annotations

import torch

from crosschip.checkpoint.nxd.heads import kv_order, named_layout, query_order
from crosschip.checkpoint.nxd.metadata import INTERLEAVE, TILE, FusedLinears, GQAQKV, Metadata, Partition, partition_of
from crosschip.errors import ConfigurationError


def local_state(model) -> dict[str, torch.Tensor]:
    """This rank's tensors of every parameter (NxD layers hold their shard as a plain tensor)."""
    return {name: param.detach() for name, param in model.named_parameters()}


def metadata(model, runtime) -> Metadata:
    from crosschip_neuron.layout import head_orders

    tp = runtime.parallel.tp
    meta = Metadata(source="crosschip neuron backend")
    strides: dict[str, int] = {}
    for path, module in model.named_modules():
        info = getattr(module, "crosschip_component", None)
        if info is None or info.backend != "neuron":
            continue
        parent = path.rpartition(".")[0]
        if info.component == "qkv_projection" and path.endswith(".qkv_proj"):
            spec = info.spec
            queries, kvs, label = head_orders(spec, tp)
            layout = INTERLEAVE if "adjacent" in label else TILE
            entry = GQAQKV(parent, "qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", spec.num_heads,
                           spec.num_kv_heads, module.copies, module.q_output_size_per_partition,
                           module.kv_output_size_per_partition, module.fuse_qkv, spec.bias, tp, layout)
            entry = named_layout(entry)  # one KV head: both arrangements alike, and Optimum's name
            if list(queries) != query_order(entry) or list(kvs) != kv_order(entry):
                raise ConfigurationError(
                    f"{path}: the KV-head arrangement this model was built with ({label or 'no replicas'}) is not "
                    f"one the NxD checkpoint metadata can describe (tile or interleave); not writing metadata "
                    "that would consolidate it wrongly")
            meta.specs.append(entry)
        elif info.component == "gated_mlp" and path.endswith(".mlp"):
            spec = info.spec
            meta.specs.append(FusedLinears(path, "gate_up_proj", ("gate_proj", "up_proj"), spec.bias, 0,
                                           (spec.intermediate_size,) * 2, tp))
            strides.update({f"{path}.gate_up_proj.weight": 2, f"{path}.gate_up_proj.bias": 2})
    for name, param in model.named_parameters():
        shard = getattr(param, "crosschip_local_shard", None)
        if shard is not None:
            (placement,) = shard[1]
            meta.parameters[name] = Partition(placement.dim, strides.get(name, 1), tp)
        else:  # tp=1: NxD's layers still mark their weights parallel (one partition), as Optimum records
            part = partition_of(name, tp)
            meta.parameters[name] = Partition(part.dim, strides.get(name, 1), tp) if part.dim is not None else part
    return meta

