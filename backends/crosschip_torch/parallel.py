"""The torch backend's parallel plan on a ``(dp, tp)`` DeviceMesh: one DTensor parallel style per
component, applied by torch.distributed (``parallelize_module``) on the ``"tp"`` dimension to
every module of that component, so every model built from these components gets it; then FSDP2
over ``"dp"`` (:mod:`crosschip_torch.data_parallel`). KV heads beyond ``tp`` are replicated
(:mod:`crosschip.parallel.kv_replication`).

Sharded: the combined QKV and gate/up projections column-wise (their interleaved row orders make a
dim-0 shard hold whole KV groups and matching gate/up pairs), ``o_proj`` and ``down_proj``
row-wise, the embedding and the LM head (tied or not) on the vocab; the loss runs on the
vocab-sharded logits (``loss_parallel``), which are gathered only when the model returns them.
Norms, rotary and attention hold replicated weights. Without ``sequence_parallel`` every rank
computes the norms whole on the replicated residual stream, so their gradients agree without
communication; with it the stream and the norms on it are sharded on the sequence dim and the
norms' partial weight gradients are summed (see :func:`_gradient_like`). Attention needs no
style: it receives this rank's heads as plain local tensors and derives head counts from their
shapes. Per-head norms (Qwen3's q/k norms) see head-sharded activations, never sequence-sharded
ones; see :func:`crosschip.parallel.distributed.per_head_norms` (their input is marked as sharded on the
head dim, ``SequenceParallel`` over dim 2, so DTensor reduces their gradients).
"""

from __future__ import annotations

from crosschip.parallel.distributed import DP_DIM, TP_DIM, per_head_norms
from crosschip.errors import ConfigurationError
from crosschip.parallel.kv_replication import KVReplicas, kv_copies, replica_groups
from crosschip_torch import data_parallel


# -- settings this backend can honour ----------------------------------------------------------
def check_runtime(runtime) -> None:
    """Parallel settings this backend can honour, checked before anything is built."""
    parallel = runtime.parallel
    if parallel.size == 1:
        return
    import torch.distributed as dist

    layout = f"tp={parallel.tp} x dp={parallel.dp}"
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigurationError(
            f"{layout} needs a process group of {parallel.size} ranks: launch with "
            f"`torchrun --nproc_per_node {parallel.size} ...` (or init_process_group) first")
    if dist.get_world_size() != parallel.size:
        raise ConfigurationError(
            f"{layout} = {parallel.size} ranks does not match the world size {dist.get_world_size()}: "
            "every process must be exactly one rank of the (dp, tp) mesh")
    _check_mesh_device(runtime.device, layout)


#: Device types a DeviceMesh of this backend can live on, with the process-group backends
#: able to run their collectives.
_MESH_DEVICES = {"cpu": ("gloo",), "cuda": ("nccl", "gloo")}


def _check_mesh_device(device, layout: str) -> None:
    import torch
    import torch.distributed as dist

    kind = device.type
    if kind not in _MESH_DEVICES:
        raise ConfigurationError(
            f"{layout} on device {device}: the torch backend builds its DeviceMesh on "
            f"{' or '.join(_MESH_DEVICES)} only, not on device type {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"{layout} on device {device}: CUDA is not available on this machine")
    backend = str(dist.get_backend()).lower()
    usable = [b for b in _MESH_DEVICES[kind] if b in backend]
    if not usable:
        raise ConfigurationError(
            f"{layout} on device {device}: the process group's backend {backend!r} cannot run "
            f"collectives on {kind!r} tensors (expected {' or '.join(_MESH_DEVICES[kind])})")


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

    class VocabColwise(ColwiseParallel):
        """Column-parallel for the LM head, an ``nn.Module`` rather than an ``nn.Linear``: its
        own weight and bias (absent when tied: it then reads the embedding's weight, already
        sharded on the vocab dim by the embedding's style) are sharded on dim 0, the vocab."""

        def _apply(self, module, device_mesh):
            from functools import partial

            from torch.distributed.tensor import distribute_module

            return distribute_module(
                module, device_mesh, self._partition_linear_fn,
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    return ColwiseHeads, VocabColwise, ColwiseParallel, RowwiseParallel


def plan(sequence_parallel: bool = False, loss_parallel: bool = True) -> dict:
    """Component name -> the style ``parallelize_module`` applies to each module of that component
    (a style, or a dict of styles for its submodules).

    Vocab parallel: the embedding is sharded on its vocab rows (each rank looks up the ids it
    holds, the partial results are summed); the LM head on its vocab rows, leaving the logits
    sharded on the vocab dim for the loss (``loss_parallel``: the loss component is this
    backend's) and gathered only where logits are returned.

    Sequence parallel (torchtitan's Llama plan): the residual stream and the norms on it are
    sharded on the sequence dim (dim 1); each column-parallel projection all-gathers its input
    sequence, each row-parallel one reduce-scatters its output back onto it.
    """
    from torch.distributed.tensor import Replicate, Shard

    colwise_heads, vocab_colwise, colwise, rowwise = _styles()
    # The residual stream: plain (replicated) tensors, or sequence-sharded DTensors, which carry
    # their global shape, so a sequence that tp does not divide (a decode step) still works.
    stream = Shard(1) if sequence_parallel else Replicate()
    local = not sequence_parallel
    row = rowwise(output_layouts=stream, use_local_output=local)
    return {
        "embedding": rowwise(input_layouts=Replicate(), output_layouts=stream, use_local_output=local),
        "qkv_projection": colwise_heads(input_layouts=stream),
        "gated_mlp": {"gate_up_proj": colwise(input_layouts=stream), "down_proj": row},
        "mlp": {"up_proj": colwise(input_layouts=stream), "down_proj": row},
        "out_projection": row,
        # A general linear by its declared style: column leaves its output sharded on the
        # feature dim (plain local tensors, for a row-parallel linear to take), row sums it back
        # onto the stream; a replicated one takes no style (see _tensor_parallel).
        "linear": {"column": colwise(input_layouts=stream), "row": row},
        "lm_head": vocab_colwise(input_layouts=stream,
                                 output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                 use_local_output=not loss_parallel),
    }


#: Components the plan may leave replicated when another backend built them (they then compute
#: whole on every rank, as before vocab parallelism); without sequence parallelism only.
_OPTIONAL = ("embedding", "lm_head")


def parallelize(model, runtime):
    """Build the ``("dp", "tp")`` mesh, apply :func:`plan` on its ``"tp"`` dimension, then shard
    over ``"dp"`` with FSDP2 (each block, then the rest), as torchtitan composes them."""
    parallel = runtime.parallel
    if parallel.size == 1:
        return None
    mesh = _mesh(runtime)
    if parallel.tp > 1:
        _tensor_parallel(model, runtime, mesh)
    experts = set()
    if parallel.ep > 1:  # experts over groups of ep data-parallel ranks (ParallelSpec: ep divides dp)
        from crosschip_torch.moe import expert_mesh, shard_experts

        experts = shard_experts(model, runtime, expert_mesh(_dim(mesh, DP_DIM), parallel.ep))
    if parallel.dp > 1:
        data_parallel.shard(model, parallel, _dim(mesh, DP_DIM), ignored=experts)
    runtime.device_mesh = mesh
    return model


def _mesh(runtime):
    from torch.distributed.device_mesh import init_device_mesh

    p = runtime.parallel
    dims = [(DP_DIM, p.dp), (TP_DIM, p.tp)]
    dims = [(name, size) for name, size in dims if size > 1]
    return init_device_mesh(runtime.device.type, tuple(size for _, size in dims),
                            mesh_dim_names=tuple(name for name, _ in dims))


def _dim(mesh, name: str):
    return mesh[name] if mesh.ndim > 1 else mesh


def _tensor_parallel(model, runtime, mesh) -> None:
    tp = runtime.parallel.tp
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    sp = runtime.parallel.sequence_parallel
    tp_mesh = _dim(mesh, TP_DIM)
    components = [(path, m) for path, m in model.named_modules()
                  if getattr(m, "crosschip_component", None) is not None]
    vocab = _vocab_parallel(components, sp, tp)
    styles = plan(sp, loss_parallel=vocab == "loss")
    if not vocab:
        styles = {k: v for k, v in styles.items() if k not in _OPTIONAL}
    groups = None
    per_head = {id(n) for n in per_head_norms(model)}
    for path, module in components:
        info = module.crosschip_component
        style = styles.get(info.component)
        if info.component == "linear":
            style = style.get(info.spec.parallel)
        if style is None:
            _by_split(path, module, info, runtime, tp_mesh, model, id(module) in per_head)
            continue
        if info.backend != "torch":
            raise ConfigurationError(
                f"tp={tp}: {info.component} at {path} was built by backend {info.backend!r}; the torch "
                "backend's parallel plan shards only its own modules")
        parallelize_module(module, tp_mesh, style)
        copies = kv_copies(info.spec, tp) if info.component == "qkv_projection" else 1
        if copies > 1:
            groups = groups or replica_groups(mesh, copies)
            module.kv_replicas = KVReplicas.for_rank(info.spec, tp, groups)


def _by_split(path, module, info, runtime, tp_mesh, model, per_head: bool) -> None:
    """A component without a style of its own in :func:`plan` (norms, attention, rotary, a
    replicated linear, a plugin's kind), placed by the split its kind declares
    (:mod:`crosschip.components.kind`), whichever backend built it; a split this plan cannot
    honour is refused, never guessed."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    from crosschip.components import kind as split  # the module of split names

    tp, sp = runtime.parallel.tp, runtime.parallel.sequence_parallel
    declared = runtime.registry.kind(info.component).tensor_parallel(info.spec)
    if per_head or declared == split.HEADS:
        # This rank's heads: replicated weights whose gradients DTensor sums (Shard on dim 2).
        parallelize_module(module, tp_mesh, SequenceParallel(sequence_dim=2, use_local_output=True))
    elif declared == split.SHARDED_FEATURES:
        _shard_projection_norm(path, module, info, tp_mesh, model)
    elif declared in (split.STREAM, split.REPLICATED):
        if sp:  # replicated weights on this rank's part of the sequence
            parallelize_module(module, tp_mesh, SequenceParallel(sequence_dim=1))
    elif declared in (split.VOCAB_EMBEDDING, split.VOCAB_HEAD, split.VOCAB_LOSS):
        pass  # whole on every rank, or on the vocab-sharded logits: see _vocab_parallel
    elif declared != split.LOCAL:
        raise ConfigurationError(
            f"tp={tp}: {info.component} at {path} (built by {info.backend!r}) declares the tensor-parallel split "
            f"{declared!r}, which the torch backend's plan shards only for its own modules of the built-in kinds")


def _shard_projection_norm(path, norm, info, tp_mesh, model) -> None:
    """A norm over a whole column-parallel projection's output (OLMo-2's q/k norms): each rank
    holds its contiguous part of the features, so the weight is sharded to match and the sum of
    squares is all-reduced in the forward (:class:`crosschip_torch.components.RMSNorm`)."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    tp = tp_mesh.size()
    where = f"tp={tp}: {info.component} at {path} (scope='projection')"
    if info.backend != "torch" or info.component != "rms_norm":
        raise ConfigurationError(f"{where} was built by backend {info.backend!r}; the torch backend's plan "
                                 "normalises a sharded projection with its own RMSNorm only")
    if info.spec.hidden_size % tp:
        raise ConfigurationError(f"{where}: tp does not divide its {info.spec.hidden_size} features")
    replicated = [m.crosschip_component.spec for m in model.modules()
                  if getattr(m, "crosschip_component", None) is not None
                  and m.crosschip_component.component == "qkv_projection"
                  and kv_copies(m.crosschip_component.spec, tp) > 1]
    if replicated:
        raise ConfigurationError(
            f"{where}: tp exceeds the KV heads ({replicated[0].num_kv_heads}), so ranks hold replicated KV "
            "heads and a projection-wide norm over them has no contiguous shard; use tp <= the KV heads")
    norm.weight = nn.Parameter(distribute_tensor(norm.weight.data, tp_mesh, [Shard(0)]),
                               requires_grad=norm.weight.requires_grad)
    norm.tp_group = tp_mesh.get_group()


def _vocab_parallel(components, sp: bool, tp: int):
    """``"loss"`` when the embedding, LM head and loss are this backend's (vocab parallel, logits
    left sharded for the loss), ``"head"`` when only the loss is not (the head gathers its
    logits), None when the embedding or head is another backend's (both stay replicated; an
    error under sequence parallelism, whose residual stream they must shard and gather)."""
    built = {m.crosschip_component.component: (path, m.crosschip_component.backend)
             for path, m in components if m.crosschip_component.component in (*_OPTIONAL, "loss")}
    foreign = [f"{c} at {p} (backend {b!r})" for c, (p, b) in built.items() if c in _OPTIONAL and b != "torch"]
    if foreign:
        if sp:
            raise ConfigurationError(
                f"tp={tp}, sequence_parallel=True: the torch backend's plan shards the sequence at "
                f"the embedding and gathers it at the LM head, but {', '.join(foreign)} is another "
                "backend's")
        return None
    return "loss" if built.get("loss", (None, "torch"))[1] == "torch" else "head"


def attach_training_hooks(model) -> None:
    """Hooks and tags that must sit on the final parameter objects (after allocation and
    loading). Under FSDP2 (dp > 1) gradients reach the gathered parameters, not these, and FSDP2
    itself puts each gradient in its parameter's tensor-parallel placement before reducing it."""
    for module in model.modules():
        replicas = getattr(module, "kv_replicas", None)
        if replicas is not None:
            for param in module.parameters():
                param.crosschip_row_copies = replicas.row_copies
    if model.runtime.parallel.ep > 1:
        from crosschip_torch.moe import average_expert_gradients

        average_expert_gradients(model, model.runtime.parallel.dp)
    if model.runtime.parallel.dp > 1:
        return
    for param in model.parameters():
        if hasattr(param, "device_mesh"):
            param.register_hook(_gradient_like(param))


def _gradient_like(param):
    """DTensor leaves its own placement on some gradients: a replicated (sequence-parallel) norm
    weight gets a ``Partial`` sum, the vocab-sharded embedding a ``Replicate`` whole (its backward
    has no row-sharded rule). Put every gradient in its parameter's placement, once, before it is
    accumulated: the partial sums are all-reduced here rather than by every optimizer op that
    touches them (or never, by code that reads the local tensor), and a sharded parameter keeps
    only its shard of the gradient (a local slice, no communication)."""
    placements = param.placements

    def hook(grad):
        if hasattr(grad, "placements") and grad.placements != placements:
            grad = grad.redistribute(placements=placements)
        return grad

    return hook
