"""Tensor parallelism of the neuron backend with neuronx-distributed's own layers and groups.

NxD's layers are sharded when built (NxD's parallel state is initialised first, see
:mod:`crosschip_neuron.state`) and do their own communication. :func:`parallelize` declares
each sharded parameter to the core (:mod:`crosschip.parallel.local_shards`) on a DeviceMesh over NxD's
TP group, so checkpoints load per rank, save whole, and gradients and optimizer state read as
DTensors, as on the other backends. :func:`attach_training_hooks` adds the gradient sums NxD
leaves to its trainer: KV-replica biases (NxD's GQA layer sums the weights' only), per-head q/k
norms, and under sequence parallelism the norms and row-parallel biases that see only this
rank's positions.
"""

from __future__ import annotations

from crosschip.parallel.distributed import per_head_norms, summed_over
from crosschip.errors import ConfigurationError

#: Components whose neuron modules hold shards.
PROJECTIONS = ("qkv_projection", "out_projection", "gated_mlp")
VOCABULARY = ("embedding", "lm_head")


def shard_dims(component: str, module) -> dict[str, int]:
    """Parameter name -> the dim NxD shards it on, for a neuron-built component module."""
    if component == "qkv_projection":
        return {name: 0 for name, _ in module.named_parameters()}
    if component == "out_projection":
        return {"weight": 1}
    if component == "gated_mlp":
        return {"gate_up_proj.weight": 0, "gate_up_proj.bias": 0, "down_proj.weight": 1}
    if component in VOCABULARY:
        return {name: 0 for name, _ in module.named_parameters(recurse=False)}
    return {}


def parallelize(model, runtime):
    tp = runtime.parallel.tp
    if tp == 1:
        return None
    from torch.distributed.tensor import Shard

    from crosschip.parallel import local_shards
    from crosschip_neuron import state

    sp = runtime.parallel.sequence_parallel
    components = [(p, m) for p, m in model.named_modules() if getattr(m, "crosschip_component", None)]
    for path, module in components:
        _check_split(path, module.crosschip_component, runtime, tp, sp)
    mesh = state.tp_mesh(runtime)
    for _, module in components:
        info = module.crosschip_component
        if info.backend != "neuron":
            continue
        params = dict(module.named_parameters())
        dims = {name: dim for name, dim in shard_dims(info.component, module).items() if name in params}
        if dims:
            local_shards.declare(module, {name: (mesh, (Shard(dim),)) for name, dim in dims.items()})
        if info.component == "lm_head":
            module.mesh = mesh
    runtime.device_mesh = mesh
    return model


def _check_split(path, info, runtime, tp: int, sp: bool) -> None:
    """What NxD's layers shard must be neuron's modules; what they cannot (a projection-wide
    norm, which would normalise this rank's heads alone) is refused. The kind's declared split
    decides, whatever the component is called."""
    from crosschip.components import kind as split

    declared = runtime.registry.kind(info.component).tensor_parallel(info.spec)
    where = f"tp={tp}{', sequence_parallel=True' if sp else ''}: {info.component} at {path}"
    if declared == split.SHARDED_FEATURES:
        raise ConfigurationError(f"{where} normalises a whole column-sharded projection (scope='projection'), "
                                 "which the neuron backend's plan does not implement; use tp=1")
    sharded = (split.COLUMN, split.ROW, split.FEED_FORWARD, split.COLUMN_HEADS)
    vocabulary = (split.VOCAB_EMBEDDING, split.VOCAB_HEAD)
    if info.backend != "neuron" and (declared in sharded or (sp and declared in vocabulary)):
        raise ConfigurationError(
            f"{where} was built by backend {info.backend!r}; under the neuron backend's tensor parallelism "
            f"every projection ({', '.join(PROJECTIONS)}{', and the embedding and LM head' if sp else ''}) "
            "must be neuron's")


def attach_training_hooks(model, runtime) -> None:
    """On the final parameter objects (allocation from meta replaces them): shard marks and KV
    row counts for clipping, and the gradient sums described in the module docstring. Tensor
    hooks act before accumulation, so gradient accumulation stays right."""
    from neuronx_distributed.parallel_layers import parallel_state

    from crosschip.parallel import local_shards
    from crosschip.parallel.kv_replication import KVReplicas

    local_shards.mark_parameters(model)
    kv_group = None
    for module in model.modules():
        copies = getattr(module, "copies", 1)
        info = getattr(module, "crosschip_component", None)
        if info is None or info.component != "qkv_projection" or info.backend != "neuron" or copies == 1:
            continue
        kv_group = kv_group or parallel_state.get_kv_shared_group()
        q, kv = module.q_output_size_per_partition, module.kv_output_size_per_partition
        fused = KVReplicas(q, None, q + 2 * kv, copies).row_copies
        for name, param in module.named_parameters():
            if name.endswith("_q"):
                continue
            param.crosschip_row_copies = fused if name.endswith("_qkv") else _all_rows(copies)
            if name.startswith("bias"):  # NxD adds biases outside its GQA function: not summed there
                param.register_hook(summed_over(kv_group, rows=slice(q, None) if name.endswith("_qkv") else None))
    partial = [p for norm in per_head_norms(model) for p in norm.parameters()]
    if runtime.parallel.sequence_parallel:
        partial += _sequence_partial(model, runtime, {id(n) for n in per_head_norms(model)})
    group = parallel_state.get_tensor_model_parallel_group()
    for param in {id(p): p for p in partial}.values():
        param.register_hook(summed_over(group))


def _all_rows(copies: int):
    import torch

    return lambda rows: torch.full_like(rows, copies)


def _sequence_partial(model, runtime, per_head: set) -> list:
    """Weights applied to this rank's positions only: replicated weights on the stream (norms,
    any kind declaring the ``stream`` or ``replicated`` split) and the biases added after a
    reduce-scatter (row-parallel projections)."""
    from crosschip.components import kind as split

    out = []
    for module in model.modules():
        info = getattr(module, "crosschip_component", None)
        if info is None:
            continue
        declared = runtime.registry.kind(info.component).tensor_parallel(info.spec)
        if declared in (split.STREAM, split.REPLICATED) and id(module) not in per_head:
            out.extend(module.parameters())
        elif info.backend == "neuron" and info.component == "out_projection" and module.bias is not None:
            out.append(module.bias)
        elif info.backend == "neuron" and info.component == "gated_mlp" and module.down_proj.bias is not None:
            out.append(module.down_proj.bias)
    return out
