"""NxD's process-global parallel state, driven by the runtime: the process group,
``parallel_state.initialize_model_parallel`` at the runtime's TP degree, NxD's KV-shared group
for a replication factor, and the DeviceMesh through which the core sees NxD's shards.

NxD keeps one model-parallel layout (and one KV replication factor) per process; a runtime
asking for another while a model built for the current one is alive is refused rather than
silently re-sharding that model."""

from __future__ import annotations

import gc
import weakref

from crosschip.errors import ConfigurationError
from crosschip_neuron import cpu_mode

#: QKV modules built for the current KV-shared group (NxD looks that group up at backward time).
_KV_USERS: "weakref.WeakSet" = weakref.WeakSet()
_KV_PLATFORM: str | None = None
_MESHES: dict = {}


def ensure(runtime):
    """Initialise NxD for ``runtime`` (idempotent); returns ``parallel_state``."""
    tp = runtime.parallel.tp
    cpu_mode.nxd()
    import torch.distributed as dist
    from neuronx_distributed.parallel_layers import parallel_state

    if not dist.is_initialized():
        _process_group(runtime)
    if dist.get_world_size() != tp:
        raise ConfigurationError(
            f"tp={tp} does not match the world size {dist.get_world_size()}: on the neuron backend "
            "every process is one TP rank")
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_size()
        if current != tp:
            raise ConfigurationError(
                f"neuronx-distributed is already initialised at tp={current} in this process; a "
                f"model at tp={tp} needs its own process (NxD keeps one layout per process)")
    else:
        import torch

        with torch.device("cpu"):  # NxD computes its rank groups with tensors; the model build is on meta
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return parallel_state


def _process_group(runtime) -> None:
    """The process group NxD builds its groups on, when the caller has not made one: under
    torchrun (``WORLD_SIZE`` set) XLA's on a Trainium host or gloo in CPU mode; in one process
    without a launcher (CPU mode, tp=1) an in-memory one-rank gloo group."""
    import os

    import torch.distributed as dist

    tp = runtime.parallel.tp
    if "WORLD_SIZE" in os.environ:
        if runtime.device.type == "xla":
            from crosschip_neuron.xla import init_process_group

            init_process_group()
        else:
            dist.init_process_group("gloo")
        return
    if tp > 1 or not cpu_mode.cpu_mode_requested():
        raise ConfigurationError(
            f"tp={tp} on the neuron backend needs one process per "
            f"{'rank' if cpu_mode.cpu_mode_requested() else 'NeuronCore'}: launch with "
            f"`torchrun --nproc_per_node {tp} ...`")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def ensure_kv_group(copies: int, platform: str) -> None:
    """Make way for NxD's KV-shared group of ``copies`` replicas per KV head on ``platform``
    (NxD's GQA layer creates it, arranged for the platform): the current one is destroyed only
    when no live QKV module uses it."""
    from neuronx_distributed.parallel_layers import parallel_state

    global _KV_PLATFORM
    size = parallel_state._KV_SHARED_GROUP_SIZE
    if size is not None and (size, _KV_PLATFORM) != (copies, platform):
        gc.collect()  # models dropped by the caller but still in a reference cycle
        if len(_KV_USERS):
            raise ConfigurationError(
                f"neuronx-distributed keeps one KV-head arrangement per process: a live model uses "
                f"kv_size_multiplier={size} on {_KV_PLATFORM}, this one needs {copies} on {platform}")
        parallel_state.destroy_kv_group()
    _KV_PLATFORM = platform


def track_kv_user(module) -> None:
    _KV_USERS.add(module)


def tp_mesh(runtime):
    """A 1-D DeviceMesh over NxD's TP group, in its rank order (declared shards are DTensor
    views on it; one per process and device type, since creating one creates process groups)."""
    from neuronx_distributed.parallel_layers import parallel_state
    from torch.distributed.device_mesh import DeviceMesh

    from crosschip.parallel.distributed import TP_DIM

    ranks = tuple(parallel_state.get_tensor_model_parallel_group(as_list=True)[0])
    key = (runtime.device.type, ranks)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(runtime.device.type, list(ranks), mesh_dim_names=(TP_DIM,))
    return _MESHES[key]
