"""The torch backend's tensor-parallel plan: one DTensor parallel style per component, applied by
torch.distributed (``parallelize_module``) on a 1-D ``"tp"`` DeviceMesh to every module of that
component, so every model built from these components gets it.

Sharded: the combined QKV and gate/up projections column-wise (their interleaved row orders make a
dim-0 shard hold whole KV groups and matching gate/up pairs), ``o_proj`` and ``down_proj``
row-wise. Everything else (embedding, norms, rotary, attention, LM head, loss) stays replicated:
every rank holds and computes it whole on the replicated residual stream, so its gradients agree
across ranks without communication. Attention needs no style: it receives this rank's heads as
plain local tensors and derives head counts from their shapes. Per-head norms (Qwen3's q/k norms)
are the one replicated weight that sees sharded activations; see :func:`_per_head_norms`.
"""

from __future__ import annotations

import dataclasses

from crosschip.errors import ConfigurationError
from crosschip.specs import QKVSpec

TP_DIM = "tp"


# -- what the layout and the modules need to know about the TP degree --------------------------
def _divides(tp: int, size: int, what: str) -> None:
    if size % tp:
        raise ConfigurationError(f"tensor parallel degree tp={tp} does not divide the {what} ({size})")


def kv_replicas(spec: QKVSpec, tp: int) -> int:
    """Copies of each KV head the torch layout holds at degree ``tp``: 1 when ``tp`` divides the
    KV heads, ``tp / num_kv_heads`` when it is a multiple of them (each rank then holds one
    replica of one KV head with its query group)."""
    if tp == 1:
        return 1
    _divides(tp, spec.num_heads, "number of query heads")
    if spec.num_kv_heads % tp == 0:
        return 1
    if tp % spec.num_kv_heads == 0:
        return tp // spec.num_kv_heads
    raise ConfigurationError(
        f"tensor parallel degree tp={tp} neither divides the number of KV heads "
        f"({spec.num_kv_heads}) nor is a multiple of it, so KV heads cannot be split or replicated "
        "into whole groups per rank")


def physical_qkv_spec(spec: QKVSpec, tp: int) -> QKVSpec:
    """The spec of the module the torch backend builds: KV heads replicated where ``tp`` needs it."""
    copies = kv_replicas(spec, tp)
    return spec if copies == 1 else dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads * copies)


def check_gated_mlp(spec, tp: int) -> None:
    if tp > 1:
        _divides(tp, spec.intermediate_size, "intermediate size")


def check_out_projection(spec, tp: int) -> None:
    if tp > 1 and spec.parallel == "row":
        _divides(tp, spec.in_features, "input features of the row-parallel projection")


def check_runtime(runtime) -> None:
    """Parallel settings this backend can honour, checked before anything is built."""
    parallel = runtime.parallel
    if parallel.dp != 1 or parallel.sequence_parallel:
        raise ConfigurationError(
            f"{parallel}: the torch backend implements tensor parallelism (tp) only so far; "
            "data and sequence parallelism are not available yet")
    if parallel.tp == 1:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigurationError(
            f"tp={parallel.tp} needs a process group: launch with "
            f"`torchrun --nproc_per_node {parallel.tp} ...` (or init_process_group) first")
    if dist.get_world_size() != parallel.tp:
        raise ConfigurationError(
            f"tp={parallel.tp} does not match the world size {dist.get_world_size()}: tensor "
            "parallelism is the only parallelism so far, so every process must be one TP rank")


# -- the plan ------------------------------------------------------------------------------------
def _styles():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    class ColwiseHeads(ColwiseParallel):
        """Column-parallel for a projection that splits its own output into heads: the module
        splits its shard's local output (head counts follow from the width) and returns plain
        tensors, so there is no output layout left to convert."""

        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            return outputs

    return ColwiseHeads, ColwiseParallel, RowwiseParallel


def plan() -> dict:
    """Component name -> the style ``parallelize_module`` applies to each module of that component
    (a style, or a dict of styles for its submodules)."""
    colwise_heads, colwise, rowwise = _styles()
    return {
        "qkv_projection": colwise_heads(),
        "gated_mlp": {"gate_up_proj": colwise(), "down_proj": rowwise()},
        "out_projection": rowwise(),
    }


def parallelize(model, runtime):
    """Build the ``"tp"`` mesh and apply :func:`plan` to every planned component of ``model``."""
    tp = runtime.parallel.tp
    if tp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    mesh = init_device_mesh(runtime.device.type, (tp,), mesh_dim_names=(TP_DIM,))
    styles = plan()
    targets = [(path, m) for path, m in model.named_modules()
               if getattr(m, "crosschip_component", None) is not None
               and m.crosschip_component.component in styles]
    replica_groups = None
    for path, module in targets:
        info = module.crosschip_component
        if info.backend != "torch":
            raise ConfigurationError(
                f"tp={tp}: {info.component} at {path} was built by backend {info.backend!r}; the torch "
                "backend's parallel plan shards only its own modules")
        parallelize_module(module, mesh, styles[info.component])
        copies = kv_replicas(info.spec, tp) if info.component == "qkv_projection" else 1
        if copies > 1:
            replica_groups = replica_groups or _replica_groups(mesh, copies)
            # Gradient hooks live on parameter objects, which allocation (to_empty) replaces:
            # record what to attach, and attach_training_hooks() does it once weights are in.
            module._crosschip_kv_replicas = (mesh, replica_groups)
    for norm in _per_head_norms(model):
        parallelize_module(norm, mesh, SequenceParallel(sequence_dim=2, use_local_output=True))
    runtime.device_mesh = mesh
    return model


def attach_training_hooks(model) -> None:
    """Hooks that must sit on the final parameter objects (after allocation and loading)."""
    for module in model.modules():
        recorded = getattr(module, "_crosschip_kv_replicas", None)
        if recorded is not None:
            mesh, group = recorded
            _sum_replica_grads(module, module.crosschip_component.spec, mesh, group)


def _per_head_norms(model):
    """``rms_norm`` components beside a ``qkv_projection`` in one parent (Qwen3's q_norm and
    k_norm) normalise each head of its output, so under TP they see only this rank's heads and
    their (replicated) weights get partial gradients. Marking the input as sharded on the head
    dim (``SequenceParallel`` over dim 2 of ``[batch, seq, heads, head_dim]``) makes DTensor
    reduce those gradients across the mesh."""
    for parent in model.modules():
        children = [c for c in parent.children() if getattr(c, "crosschip_component", None) is not None]
        if any(c.crosschip_component.component == "qkv_projection" for c in children):
            yield from (c for c in children if c.crosschip_component.component == "rms_norm")


# -- KV-head replication: replicas must train as one weight ---------------------------------------
def _replica_groups(mesh, copies: int):
    """One process group per KV head, over the ranks holding its replicas (consecutive ranks, as
    :func:`crosschip.layouts.replicate_heads` orders them). Every rank creates every group."""
    import torch.distributed as dist

    ranks = mesh.mesh.flatten().tolist()
    groups = [dist.new_group(ranks[i:i + copies]) for i in range(0, len(ranks), copies)]
    return groups[mesh.get_local_rank() // copies]


def _sum_replica_grads(module, spec: QKVSpec, mesh, group) -> None:
    """The loss depends on a KV head through each of its replicas, so the head's gradient is the
    sum of the replicas' gradients; every replica gets that sum and they stay equal under any
    optimizer. A tensor hook (before accumulation) keeps gradient accumulation right."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    # Each rank holds one group: this rank's query heads, then one K and one V replica.
    q_rows = spec.num_heads // mesh.size() * spec.head_dim

    def hook(grad):
        local = grad.to_local().clone()
        kv = local[q_rows:].contiguous()
        dist.all_reduce(kv, group=group)
        local[q_rows:] = kv
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False,
                                  shape=grad.shape, stride=grad.stride())

    for param in module.parameters():
        param.register_hook(hook)
