"""Tensor parallelism of the te backend with Transformer Engine's own tensor-parallel groups.

The factories build every TE module with ``tp_size`` (so it allocates only this rank's shard):
the QKV projection column-parallel (``parallel_mode="column"``, whole KV groups per rank), the
attention output projection row-parallel, ``LayerNormMLP`` (gated or not) with
``set_parallel_mode`` (fc1 column, fc2 row), a general ``linear`` as its spec's ``parallel`` says and ``DotProductAttention`` over this rank's heads. :func:`parallelize` then
creates the 1-D ``"tp"`` DeviceMesh, hands its process group to every TE module
(``set_tensor_parallel_group``, TE's deferred form) and declares which parameters are shards
(:mod:`crosschip.parallel.local_shards`), so checkpoints load, save and report gradients as for the torch
backend. TE does the communication itself: the row-parallel GEMMs all-reduce their output, the
column-parallel ones all-reduce the input gradient (before the fused norm's backward, so the
replicated norm weights get whole, equal gradients on every rank).

Left replicated: norms, and the embedding, LM head and loss, which te does not build.
With ``sequence_parallel=True`` TE's layers also shard the residual stream along the sequence
(:mod:`crosschip_te.sequence_parallel`). Where ``tp`` exceeds the KV heads they are replicated, one
whole group per rank (:mod:`crosschip.parallel.kv_replication`), and the replicas' gradients summed by a
hook on the QKV weight. Not implemented on te: data parallelism (the torch backend does it).
"""

from __future__ import annotations

import torch

from crosschip.parallel.distributed import TP_DIM, per_head_norms, summed_over
from crosschip.errors import ConfigurationError
from crosschip.parallel.kv_replication import KVReplicas, kv_copies, replica_groups

#: Components whose te modules hold shards; under te TP no other backend may build them.
SHARDED = ("qkv_projection", "out_projection", "gated_mlp", "mlp", "linear")


def tp_degree(ctx) -> int:
    """The TP degree a te factory builds for, after checking the settings te can honour."""
    if ctx is None:
        return 1
    parallel = ctx.parallel
    if parallel.dp != 1:
        raise ConfigurationError(
            f"{parallel}: the te backend implements tensor parallelism (tp) only; data "
            "parallelism (dp) runs on backend='torch'")
    return parallel.tp


def sequence_parallel(ctx, tp: int) -> bool:
    """Whether te modules run sequence parallel (TE's ``sequence_parallel`` flag)."""
    return tp > 1 and ctx is not None and ctx.parallel.sequence_parallel


def linear_mode(spec, tp: int) -> str | None:
    """TE's ``parallel_mode`` for a linear spec: None (replicated) at tp=1."""
    return spec.parallel if tp > 1 and spec.parallel in ("column", "row") else None


# -- applied after construction (the "parallelize" hook) ------------------------------------------
def check_process_group(runtime) -> None:
    import torch.distributed as dist

    tp = runtime.parallel.tp
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigurationError(
            f"tp={tp} needs a process group: launch with `torchrun --nproc_per_node {tp} ...` "
            "(or init_process_group) first")
    if dist.get_world_size() != tp:
        raise ConfigurationError(
            f"tp={tp} does not match the world size {dist.get_world_size()}: on the te backend "
            "every process is one TP rank")


def parallelize(model, runtime):
    tp = runtime.parallel.tp
    if tp == 1:
        return None
    check_process_group(runtime)
    from torch.distributed.device_mesh import init_device_mesh

    components = [(path, m) for path, m in model.named_modules()
                  if getattr(m, "crosschip_component", None) is not None]
    for path, module in components:
        info = module.crosschip_component
        if info.component in SHARDED and info.backend != "te":
            raise ConfigurationError(
                f"tp={tp}: {info.component} at {path} was built by backend {info.backend!r}; under the "
                "te backend's tensor parallelism the projections must all be te's (choose the same "
                "backend for qkv_projection, out_projection and gated_mlp)")
    mesh = init_device_mesh(runtime.device.type, (tp,), mesh_dim_names=(TP_DIM,))
    group = mesh.get_group()
    groups = None
    for _, module in components:
        info = module.crosschip_component
        if info.backend != "te":
            continue
        _bind(module, mesh, group)
        copies = kv_copies(info.spec, tp) if info.component == "qkv_projection" else 1
        if copies > 1:  # every layer's replicas use one set of groups
            groups = groups or replica_groups(mesh, copies)
            module.kv_replicas = KVReplicas.for_rank(info.spec, tp, groups)
    if runtime.parallel.sequence_parallel:
        from crosschip_te.sequence_parallel import install

        install(model, group)
    runtime.device_mesh = mesh
    return model


def _bind(component, mesh, group) -> None:
    """Give every TE module in ``component`` the TP group and declare its sharded parameters."""
    from torch.distributed.tensor import Shard

    from crosschip.parallel.local_shards import declare

    shards = {}
    for prefix, sub in component.named_modules():
        if not hasattr(sub, "set_tensor_parallel_group"):
            continue
        sub.set_tensor_parallel_group(group)
        own = dict(sub.named_parameters(recurse=False))
        for name, dim in shard_dims(sub).items():
            if name in own:
                shards[f"{prefix}.{name}" if prefix else name] = (mesh, (Shard(dim),))
    if shards:
        declare(component, shards)


def shard_dims(te_module) -> dict[str, int]:
    """Parameter name -> the dim a TE module shards it on, read off the module's own TP mode.
    (TE's ``partition_dim`` attributes mark weights even of non-parallel modules, so the mode
    decides.) Unlisted parameters (norm weights, a row-parallel bias) are replicated."""
    if getattr(te_module, "tp_size", 1) == 1:
        return {}
    if hasattr(te_module, "fc1_weight"):  # LayerNormMLP: fc1 column-, fc2 row-parallel
        return {"fc1_weight": 0, "fc1_bias": 0, "fc2_weight": 1} if te_module.set_parallel_mode else {}
    mode = getattr(te_module, "parallel_mode", None)
    weights = getattr(te_module, "weight_names", [])
    if mode == "column":
        return {n: 0 for n in (*weights, *getattr(te_module, "bias_names", []))}
    if mode == "row":
        return {n: 1 for n in weights}
    return {}


# -- after loading (the "finalize" hook) ------------------------------------------------------------
def attach_training_hooks(model, runtime) -> None:
    """On the final parameter objects: the shard marks (for gradient clipping), and, for
    per-head norms beside a te QKV projection (Qwen3's q_norm / k_norm), which see only this
    rank's heads so that their replicated weights get partial gradients, a sum over the TP group.
    A tensor hook (before accumulation) keeps gradient accumulation right."""
    from crosschip.parallel.local_shards import mark_parameters

    mark_parameters(model)
    for module in model.modules():
        replicas = getattr(module, "kv_replicas", None)
        if replicas is not None:  # the QKV rows of TE's weight and bias, not the fused norm's
            for param in (module.proj.weight, getattr(module.proj, "bias", None)):
                if isinstance(param, torch.nn.Parameter) and param.numel():
                    param.crosschip_row_copies = replicas.row_copies
                    param.register_hook(replicas.sum_kv_rows)
    norms = list(per_head_norms(model))
    partial = [p for norm in norms for p in norm.parameters()]
    if runtime.parallel.sequence_parallel:
        from crosschip_te.sequence_parallel import partial_gradient_params

        partial += partial_gradient_params(model, norms)
    group = runtime.device_mesh.get_group(TP_DIM)
    for param in partial:
        param.register_hook(summed_over(group))
