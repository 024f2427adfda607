"""The stand-in ``torch_xla`` of NxD's CPU mode (see :mod:`crosschip_neuron.cpu_mode`, which
assembles these into modules, and only where the real torch_xla is absent).

``torch_xla.core.xla_model`` (:func:`xla_model_namespace`):

- reduce-op constants, a no-op ``mark_step``, and the three collectives NxD's GQA layer calls on
  ``xm`` directly, routed to the gloo group NxD built for the replica groups they name. A single
  tensor comes back as a new tensor; a list is reduced *in place* as well, as torch_xla documents
  (the GQA backward uses the returned list; NxD's xser loader broadcasts by summing into its
  list's tensors and never reads the return).
- for ``neuronx_distributed.trainer`` checkpointing: ``rendezvous`` (a barrier on the default
  process group: NxD orders directory creation, file writes and the ``done`` marker with it),
  ``xla_device`` (the CPU: loaded tensors are moved "to the device"), and ``ToXlaTensorArena``
  (NxD's walker over a nested state dict: collect the values ``select_fn`` picks, convert them in
  one call, substitute the results back).

``torch_xla._XLAC._xla_sync_multi``: a no-op (nothing is pending on CPU); NxD calls it before it
copies tensors off the device.

``torch_xla.runtime`` (:func:`runtime_namespace`): ``local_ordinal`` (which of a host's ranks
saves or loads in NxD's worker rounds) and ``world_size``, from torch.distributed.

``torch_xla.core.xla_env_vars.HOST_WORLD_SIZE``: the name of the variable NxD reads the number of
hosts from, torch_xla's (``XRT_HOST_WORLD_SIZE``); :mod:`cpu_mode` defaults it to one host.

``torch_xla.utils.serialization`` (:func:`serialization_namespace`): ``TensorReference``, the
object NxD's xser format pickles in place of each tensor; it pickles under torch_xla's own name
(``torch_xla.utils.serialization.TensorReference``, state ``{"tid": int}``) so the files are
those NxD writes on Trainium. And the two path helpers NxD calls.

``torch_xla.distributed.zero_redundancy_optimizer.ZeroRedundancyOptimizer``,
``torch_xla.distributed.parallel_loader.MpDeviceLoader`` and ``torch_xla.utils.checkpoint.checkpoint``:
NxD subclasses or imports them at module level (its ZeRO-1 optimizer, its data loading, its
activation-checkpoint wrapper: the trainer's import chain); they raise when made or called, as CPU
mode has none of them."""

from __future__ import annotations

REDUCE_SUM = "sum"
REDUCE_MAX = "max"
REDUCE_MIN = "min"

#: (replica-groups global, process-group global) pairs of ``parallel_state`` an ``xm`` call may name.
_GROUPS = (
    ("_TENSOR_MODEL_PARALLEL_GROUP_SPMD", "_TENSOR_MODEL_PARALLEL_GROUP"),
    ("_KV_SHARED_GROUP_SPMD", "_KV_SHARED_GROUP"),
    ("_DATA_PARALLEL_GROUP_SPMD", "_DATA_PARALLEL_GROUP"),
    ("_WORLD_GROUP_SPMD", "_WORLD_GROUP"),
)


def xla_model_namespace() -> dict:
    return {"REDUCE_SUM": REDUCE_SUM, "REDUCE_MAX": REDUCE_MAX, "REDUCE_MIN": REDUCE_MIN,
            "mark_step": mark_step, "all_reduce": all_reduce, "all_gather": all_gather,
            "reduce_scatter": reduce_scatter, "master_print": print, "rendezvous": rendezvous,
            "xla_device": xla_device, "ToXlaTensorArena": ToXlaTensorArena}


def mark_step(*args, **kwargs) -> None:
    """Nothing is traced on CPU: there is no graph to cut."""


def rendezvous(tag: str, payload: bytes = b"", replicas=()) -> list:
    """Every rank waits here (a barrier on the default process group). NxD passes only a tag;
    exchanging payloads or meeting a subset of replicas is not provided."""
    import torch.distributed as dist

    if payload or replicas:
        raise NotImplementedError("the CPU-mode rendezvous is a plain barrier: no payloads, no replica subsets")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return []


def xla_device(n=None, devkind=None):
    """The device NxD's CPU mode computes on."""
    import torch

    return torch.device("cpu")


def sync_multi(tensors, devices=None, wait=True, sync_xla_data=True) -> None:
    """``torch_xla._XLAC._xla_sync_multi``: nothing is pending on CPU tensors."""


class ToXlaTensorArena:
    """Rewrites a nested structure in one batch: ``transform(data)`` collects, depth first in
    iteration order, every value that ``select_fn`` picks; passes that list to ``convert_fn`` once;
    and returns a copy of ``data`` with each picked value replaced by its converted counterpart.

    As in torch_xla: a value met twice (the same object, e.g. a tied weight) is collected once and
    both places get the same result; dict keys are walked too; dicts and sets are rebuilt, and
    lists *and tuples* come back as lists (so NxD's files hold lists where the state held tuples,
    e.g. Adam's ``betas``, as on Trainium). Other values, tensors that are not picked included,
    are kept as they are (torch_xla also copies and walks other objects' ``__dict__``; NxD's
    state dicts hold none)."""

    def __init__(self, convert_fn, select_fn):
        self._convert_fn = convert_fn
        self._select_fn = select_fn

    def transform(self, inputs):
        picked: dict[int, object] = {}
        self._collect(inputs, picked, set())
        values = list(picked.values())
        converted = self._convert_fn(values) if values else []
        if len(converted) != len(values):
            raise RuntimeError(f"convert_fn returned {len(converted)} values for {len(values)} inputs")
        return self._rewrite(inputs, dict(zip(picked, converted)), {})

    def _collect(self, value, picked: dict, seen: set) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if self._select_fn(value):
            picked[id(value)] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                self._collect(k, picked, seen)
                self._collect(v, picked, seen)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                self._collect(item, picked, seen)

    def _rewrite(self, value, converted: dict, done: dict):
        key = id(value)
        if key in converted:
            return converted[key]
        if key in done:
            return done[key]
        if isinstance(value, dict):
            result = done[key] = {}
            for k, v in value.items():
                result[self._rewrite(k, converted, done)] = self._rewrite(v, converted, done)
        elif isinstance(value, set):
            result = done[key] = set()
            result.update(self._rewrite(item, converted, done) for item in value)
        elif isinstance(value, (list, tuple)):
            result = done[key] = []
            result.extend(self._rewrite(item, converted, done) for item in value)
        else:
            result = value
        return result


# -- torch_xla.runtime ---------------------------------------------------------------------------
HOST_WORLD_SIZE = "XRT_HOST_WORLD_SIZE"


def runtime_namespace() -> dict:
    return {"local_ordinal": local_ordinal, "world_size": world_size}


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_ordinal() -> int:
    """This process's index among its host's ranks: ``LOCAL_RANK`` (torchrun sets it), else the
    global rank modulo the ranks per host (``LOCAL_WORLD_SIZE``, else the world size over
    ``XRT_HOST_WORLD_SIZE`` hosts, one by default)."""
    import os

    import torch.distributed as dist

    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or world_size() // int(os.environ.get(HOST_WORLD_SIZE, 1))
    return dist.get_rank() % max(per_host, 1)


# -- torch_xla.utils.serialization ---------------------------------------------------------------
class TensorReference:
    """Stands in a pickled xser state dict for the tensor saved as ``tensor_<tid>.pt``. Pickled as
    torch_xla's own class (same global name, same instance state ``{"tid": tid}``), so a file
    written here is one torch_xla and NxD read on Trainium, and the other way round."""

    def __init__(self, tid):
        self.tid = tid

    def __repr__(self) -> str:
        return f"TensorReference(tid={self.tid})"


TensorReference.__module__ = "torch_xla.utils.serialization"
TensorReference.__qualname__ = "TensorReference"


def _get_tensors_folder(path: str) -> str:
    return path + ".tensors"


def _get_tensor_file(path: str, tid: int) -> str:
    import os

    return os.path.join(path, f"tensor_{tid}.pt")


def serialization_namespace() -> dict:
    return {"TensorReference": TensorReference, "_get_tensors_folder": _get_tensors_folder,
            "_get_tensor_file": _get_tensor_file}


# -- import-only classes -------------------------------------------------------------------------
class _ImportOnly:
    _what = ""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__qualname__} ({self._what}) needs torch_xla on an XLA device; NxD's CPU "
                           "mode (NXD_CPU_MODE=1, no Neuron SDK) has a stand-in only so that NxD imports")


class ZeroRedundancyOptimizer(_ImportOnly):
    """torch_xla's ZeRO-1 optimizer: NxD's ``NeuronZero1Optimizer`` subclasses it at import."""

    _what = "ZeRO-1 sharded optimizer"


def checkpoint(*args, **kwargs):
    """``torch_xla.utils.checkpoint.checkpoint``: NxD's activation-checkpoint wrapper binds it at
    import (the trainer imports that module); raises if called."""
    raise RuntimeError("torch_xla's activation checkpointing needs torch_xla on an XLA device; NxD's CPU mode "
                       "(NXD_CPU_MODE=1, no Neuron SDK) has a stand-in only so that NxD imports")


class MpDeviceLoader(_ImportOnly):
    """torch_xla's device-feeding data loader: NxD's trainer imports it."""

    _what = "XLA device data loader"


def process_group(groups):
    """The gloo process group NxD created for ``groups`` (a list of rank lists, as NxD passes to
    XLA collectives), or a ProcessGroup passed as it is."""
    if groups is None or not isinstance(groups, (list, tuple)):
        return groups
    from neuronx_distributed.parallel_layers import parallel_state
    from neuronx_distributed.utils import cpu_mode

    if not cpu_mode():
        raise RuntimeError("an XLA collective was called without the Neuron SDK and without NxD's CPU mode "
                           "(NXD_CPU_MODE=1): there is no device to run it on")
    wanted = [list(g) for g in groups]
    for spmd_name, group_name in _GROUPS:
        if getattr(parallel_state, spmd_name, None) == wanted:
            return getattr(parallel_state, group_name)
    raise RuntimeError(f"no NxD process group matches the replica groups {wanted}")


def all_reduce(reduce_type, inputs, scale: float = 1.0, groups=None, pin_layout: bool = True, **_):
    from neuronx_distributed.parallel_layers import comm

    import torch

    single = not isinstance(inputs, (list, tuple))
    # Row-major copies: gloo reduces raw memory, and a plain clone keeps a view's stride order
    # (a transposed slice stays column-major on the rank that has it, while a peer's zeros are
    # row-major: the sum then mixes elements).
    tensors = [t.clone(memory_format=torch.contiguous_format) for t in ([inputs] if single else inputs)]
    comm.all_reduce(reduce_type, tensors, groups=process_group(groups))
    if scale != 1.0:
        tensors = [t * scale for t in tensors]
    if single:
        return tensors[0]
    for target, reduced in zip(inputs, tensors):  # a list is reduced in place, as torch_xla's
        target.copy_(reduced)
    return list(inputs)


def all_gather(value, dim: int = 0, groups=None, output=None, pin_layout: bool = True, **_):
    from neuronx_distributed.parallel_layers import comm

    return comm.all_gather(value.contiguous(), dim=dim, groups=process_group(groups), output=output)


def reduce_scatter(reduce_type, value, scale, scatter_dim, shard_count, groups=None, output=None,
                   pin_layout: bool = True, **_):
    import torch
    from neuronx_distributed.parallel_layers import comm

    group = process_group(groups)
    if output is None:  # NxD's CPU branch fills ``output`` and returns None without one
        shape = list(value.shape)
        shape[scatter_dim] //= shard_count
        output = torch.empty(shape, dtype=value.dtype, device=value.device)
    comm.reduce_scatter(reduce_type, value.contiguous(), scale, scatter_dim, shard_count, groups=group,
                        output=output)
    return output
