"""Importing neuronx-distributed (NxD), on a Trainium host or in NxD's own CPU mode.

On a Trainium host the Neuron SDK provides ``torch_xla``, ``torch_neuronx`` and ``neuronxcc``,
and NxD imports as it is. On a machine without the SDK, NxD's CPU mode (``NXD_CPU_MODE=1``: gloo
process groups, CPU tensors) still needs those modules at import time, for names CPU mode never
calls. This module then registers *stand-ins* for exactly those names, and only for modules that
are not installed: a real ``torch_xla`` or ``torch_neuronx`` is never replaced.

What the stand-ins hold, and why:

- ``torch_xla.core.xla_model``: the reduce-op constants NxD's layers key their gloo mapping on,
  ``mark_step`` (a no-op: nothing is traced on CPU), and the three collectives that
  ``GQAQKVColumnParallelLinear`` calls directly instead of through NxD's ``parallel_layers.comm``
  (with ``kv_size_multiplier > 1`` and under sequence parallelism). Those three are routed to the
  gloo process group NxD built for the replica groups they name (its TP or KV-shared group),
  through NxD's own CPU-mode collectives. (With the real torch_xla on CPU tensors that
  ``all_reduce`` is a silent no-op, and the K/V gradients come out wrong.)
- for NxD's trainer checkpointing (``save_checkpoint`` / ``load_checkpoint``, plain and xser):
  ``xm.rendezvous`` / ``xla_device`` / ``ToXlaTensorArena``, ``torch_xla.runtime``'s ordinals,
  ``torch_xla.core.xla_env_vars.HOST_WORLD_SIZE`` (its variable defaulted here to one host),
  ``torch_xla._XLAC._xla_sync_multi``, ``torch_xla.utils.serialization.TensorReference`` (pickled
  under torch_xla's own name, so xser files are those NxD writes on Trainium), and import-only
  ``ZeroRedundancyOptimizer``, ``MpDeviceLoader`` and ``torch_xla.utils.checkpoint.checkpoint``
  that raise if used. What each does, and why: :mod:`crosschip_neuron.xla_standin`.
- ``transformers.utils.fx.HFTracer`` (:func:`install_transformers_fx`, where transformers >= 5
  has none): NxD's pipeline module, which its trainer imports, subclasses it at import.
- ``torch_neuronx.utils.get_platform_target``: the platform NxD arranges KV-head groups for. It
  honours ``NEURON_PLATFORM_TARGET_OVERRIDE``, as the real one does (that is also how people
  compile for a platform on a host without devices), and is ``trn1`` otherwise.
- ``neuronxcc.nki._private_kernels.collectives.CollectivesConfig``: NxD reads one rank's
  send/receive pairs from it at model-parallel initialisation (for ring attention, unused here).

``import neuronx_distributed`` itself also imports NKI kernels, tracing and the trainer, which
need the real SDK; :func:`nxd` therefore registers the package without running its
``__init__`` when the SDK is absent, and its subpackages import from the installed files.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

#: Platform the stand-in reports without ``NEURON_PLATFORM_TARGET_OVERRIDE``.
DEFAULT_PLATFORM = "trn1"
PLATFORM_OVERRIDE = "NEURON_PLATFORM_TARGET_OVERRIDE"
CPU_MODE = "NXD_CPU_MODE"

_SDK_MODULES = ("torch_xla", "torch_neuronx")


def sdk_installed() -> bool:
    """Whether the Neuron SDK's torch packages are importable (checked without importing)."""
    return all(_find(name) for name in _SDK_MODULES)


def nxd_installed() -> bool:
    return _find("neuronx_distributed")


def cpu_mode_requested() -> bool:
    """NxD's own switch, read the way NxD reads it."""
    return int(os.environ.get(CPU_MODE, "0") or 0) > 0


def _find(name: str) -> bool:
    if name in sys.modules:
        return getattr(sys.modules[name], "__crosschip_standin__", False) is False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def nxd():
    """The ``neuronx_distributed`` package, importable for its parallel layers: as it is with the
    Neuron SDK, else with the stand-ins above and without running the package ``__init__``."""
    if sdk_installed():
        install_transformers_fx()  # the package __init__ imports the trainer, and so the pipeline
        import neuronx_distributed

        return neuronx_distributed
    _install_standins()
    package = sys.modules.get("neuronx_distributed")
    if package is None:
        spec = importlib.util.find_spec("neuronx_distributed")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("neuronx_distributed is not installed")
        package = types.ModuleType("neuronx_distributed")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = importlib.machinery.ModuleSpec("neuronx_distributed", None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__
        package.__file__ = spec.origin
        sys.modules["neuronx_distributed"] = package
    return package


def platform_target() -> str:
    """The platform NxD arranges KV-head replicas for: the Neuron SDK's answer where it is
    installed, else the stand-in's (``NEURON_PLATFORM_TARGET_OVERRIDE`` or ``trn1``)."""
    nxd()
    from torch_neuronx.utils import get_platform_target

    return get_platform_target()


# -- the stand-ins -------------------------------------------------------------------------------
def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    # A spec, so that importlib (and transformers' import checks) can reason about it.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    module.__crosschip_standin__ = True
    module.__dict__.update(attrs)
    return module


def _install_standins() -> None:
    if not _find("torch_xla"):
        _install_torch_xla()
    if not _find("torch_neuronx"):
        utils = _module("torch_neuronx.utils", get_platform_target=_get_platform_target)
        _register(_module("torch_neuronx", utils=utils), utils)
    if not _find("neuronxcc"):
        names = ("neuronxcc", "neuronxcc.nki", "neuronxcc.nki._private_kernels",
                 "neuronxcc.nki._private_kernels.collectives")
        modules = [_module(n) for n in names]
        modules[-1].CollectivesConfig = _CollectivesConfig
        _register(*modules)


def _register(*modules: types.ModuleType) -> None:
    for module in modules:
        sys.modules.setdefault(module.__name__, module)
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, sys.modules[module.__name__])


def install_transformers_fx() -> None:
    """``transformers.utils.fx.HFTracer`` for NxD's pipeline module, where transformers is
    installed without it (5.0 removed its fx tracer). ``neuronx_distributed.trainer`` imports the
    pipeline (for an ``isinstance`` check in ``save_checkpoint``), whose tracer module subclasses
    ``HFTracer`` at import when transformers is importable; the stand-in raises if used.
    Separate from :func:`nxd` without the SDK: finding out imports ``transformers.utils``, which
    the parallel layers never need."""
    if not _find("transformers") or "transformers.utils.fx" in sys.modules:
        return
    try:
        if importlib.util.find_spec("transformers.utils.fx") is not None:
            return
    except (ImportError, ValueError):
        return
    import torch.fx

    class HFTracer(torch.fx.Tracer):
        """Stand-in: transformers >= 5 has no fx tracer."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("transformers.utils.fx.HFTracer is gone from transformers >= 5.0; NxD's "
                               "pipeline tracing of Hugging Face models needs transformers < 5")

    HFTracer.__module__ = "transformers.utils.fx"
    _register(_module("transformers.utils.fx", HFTracer=HFTracer))


def _get_platform_target() -> str:
    return os.environ.get(PLATFORM_OVERRIDE) or DEFAULT_PLATFORM


class _CollectivesConfig:
    """NxD reads ``rank_src_tgt_pairs[rank]`` once at model-parallel init (ring attention)."""

    def __init__(self, replica_groups=None, **_):
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank_src_tgt_pairs = [[] for _ in range(world)]


def _install_torch_xla() -> None:
    from crosschip_neuron import xla_standin as x

    # accelerate (which transformers imports when installed) takes importable torch_xla modules
    # for an XLA install and then imports parts of it no stand-in provides; its documented
    # switch tells it to stay native. (No real torch_xla is present, or no stand-in is made.)
    os.environ.setdefault("USE_TORCH_XLA", "0")
    # NxD's trainer divides the world size by this many hosts to find the ranks per host (its
    # save / load worker rounds); a CPU-mode run spread over several hosts sets it.
    os.environ.setdefault(x.HOST_WORLD_SIZE, "1")

    xla_model = _module("torch_xla.core.xla_model", **x.xla_model_namespace())
    env_vars = _module("torch_xla.core.xla_env_vars", HOST_WORLD_SIZE=x.HOST_WORLD_SIZE)
    core = _module("torch_xla.core", xla_model=xla_model, xla_env_vars=env_vars)
    serialization = _module("torch_xla.utils.serialization", **x.serialization_namespace())
    act_checkpoint = _module("torch_xla.utils.checkpoint", checkpoint=x.checkpoint)
    utils = _module("torch_xla.utils", serialization=serialization, checkpoint=act_checkpoint)
    runtime = _module("torch_xla.runtime", **x.runtime_namespace())
    xlac = _module("torch_xla._XLAC", _xla_sync_multi=x.sync_multi)
    zero = _module("torch_xla.distributed.zero_redundancy_optimizer",
                   ZeroRedundancyOptimizer=x.ZeroRedundancyOptimizer)
    loader = _module("torch_xla.distributed.parallel_loader", MpDeviceLoader=x.MpDeviceLoader)
    distributed = _module("torch_xla.distributed", zero_redundancy_optimizer=zero, parallel_loader=loader)
    root = _module("torch_xla", core=core, runtime=runtime, utils=utils, distributed=distributed, _XLAC=xlac)
    _register(root, core, xla_model, env_vars, runtime, utils, serialization, act_checkpoint, xlac, distributed, zero,
              loader)
