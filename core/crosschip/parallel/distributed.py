"""What every backend's parallel plan shares: the mesh dimension names, the divisibility checks a
tensor-parallel degree must pass, the per-head norms whose gradients need a sum, and leaving the
process group cleanly (CLI, examples, tests)."""

from __future__ import annotations

import gc

from crosschip.errors import ConfigurationError

#: Names of the DeviceMesh dimensions every backend's parallel plan uses: ``(dp, tp)``.
DP_DIM = "dp"
TP_DIM = "tp"


def shutdown() -> None:
    """Leave the default process group cleanly: wait for every rank, destroy the group, and free
    whatever still holds it before the interpreter exits.

    Why the last step: a model left in a reference cycle (an exception's traceback is enough)
    keeps its DeviceMesh, and with it the gloo group and its worker threads, alive until the
    interpreter's final garbage collection. A worker that then releases a finished collective's
    Python-owned tensor needs the GIL, which a finalizing interpreter no longer hands out; the
    thread exits inside a destructor and the process aborts ("terminate called without an
    active exception") after all the work succeeded. Collecting here, while the interpreter is
    whole, tears the group down in order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank closes its connections while a peer still talks to it
        dist.destroy_process_group()
    gc.collect()


def join_launched_group(device: str | None) -> bool:
    """Join the process group a launcher (torchrun: ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...)
    describes, when none exists yet: NCCL on CUDA (this process's ``LOCAL_RANK`` device), XLA's
    on Trainium, gloo on CPU. Returns whether this call created it; without a launcher nothing
    happens and the caller's checks say what is missing."""
    import os

    import torch
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    kind = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    elif kind == "xla":  # Trainium: one process per NeuronCore, XLA's collectives
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

        dist.init_process_group("xla", init_method="xla://")
    else:
        dist.init_process_group("gloo")
    return True


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank of the default process group (nothing without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_divides(tp: int, size: int, what: str) -> None:
    """A tensor-parallel degree must split ``what`` (heads, features) evenly over the ranks."""
    if size % tp:
        raise ConfigurationError(f"tensor parallel degree tp={tp} does not divide the {what} ({size})")


def check_sequence_divides(seq: int, tp: int, backend: str) -> None:
    """Sequence parallelism cuts every sequence into ``tp`` equal parts."""
    if seq % tp:
        raise ConfigurationError(
            f"{backend} sequence parallelism: tp={tp} does not divide the sequence length ({seq}); pad the "
            "batch to a multiple of tp, or load the model with sequence_parallel=False for this use "
            "(generation, whose decode steps have one position)")


def check_gated_mlp(spec, tp: int) -> None:
    """A column-parallel gate/up and row-parallel down projection split the intermediate size."""
    if tp > 1:
        check_divides(tp, spec.intermediate_size, "intermediate size")


def check_linear(spec, tp: int) -> None:
    """A row-parallel projection splits its input features, a column-parallel one its outputs."""
    if tp > 1 and spec.parallel == "row":
        check_divides(tp, spec.in_features, "input features of the row-parallel projection")
    if tp > 1 and spec.parallel == "column":
        check_divides(tp, spec.out_features, "output features of the column-parallel projection")


def summed_over(group, rows: slice | None = None):
    """A gradient hook returning the gradient summed over ``group`` (all of it, or the ``rows``
    slice of dim 0): for weights each rank applies to its own part of the data (per-head norms
    on this rank's heads, norms on this rank's positions, replicas of one KV head)."""
    import torch.distributed as dist

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad if rows is None else grad[rows], group=group)
        return grad

    return hook


def per_head_norms(model):
    """Components whose kind declares the ``heads`` split (a norm with ``scope="head"``: Qwen3's
    q_norm and k_norm): under tensor parallelism they see only this rank's heads and their
    replicated weights get partial gradients, which every backend's plan must sum over the TP
    ranks.

    A norm that does not state its scope (the default ``"hidden"``) but is sized to the head of
    a ``qkv_projection`` beside it in one parent is taken as per-head too, as before scopes were
    declared, with a deprecation warning (model files written against the older API keep
    working). A hidden-size norm beside a projection (a block's input norm) is not."""
    import warnings

    from crosschip.components.kind import HEADS

    kinds = model.runtime.registry.kind
    for parent in model.modules():
        children = [c for c in parent.children() if getattr(c, "crosschip_component", None) is not None]
        projections = [c.crosschip_component.spec for c in children
                       if c.crosschip_component.component == "qkv_projection"]
        for child in children:
            info = child.crosschip_component
            if kinds(info.component).tensor_parallel(info.spec) == HEADS:
                yield child
            elif info.component in ("rms_norm", "layer_norm") and info.spec.scope == "hidden" and any(
                    info.spec.hidden_size == p.head_dim != p.hidden_size for p in projections):
                warnings.warn(
                    f"a {info.component} of size {info.spec.hidden_size} (the head dim) beside a qkv_projection "
                    "is taken as a per-head norm; declare it with scope='head' (NormSpec(..., scope='head')), "
                    "as this guess will be removed", DeprecationWarning, stacklevel=2)
                yield child
