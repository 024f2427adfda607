"""Hook implementations of the ``liger`` backend: Liger-Kernel's Triton kernels for four
components (``rms_norm``, ``gated_mlp``, ``rotary``, ``loss``); every other component falls back
along the chain.

crosschip imports this module whenever it lists or resolves backends, so it imports neither torch
nor liger_kernel. The probe looks for the packages with ``importlib.util.find_spec`` and asks torch
for a CUDA device without creating a context.
"""

from __future__ import annotations

import importlib
import importlib.util

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl

NAME = "liger"  # must equal the entry-point name
_SUPPORT = "crosschip_liger.support"
_LAYOUT = "crosschip_liger.layout"
#: The reason everywhere liger-kernel is absent (CPU CI, a GPU image without it).
NOT_INSTALLED = "liger-kernel is not installed (pip install 'crosschip-liger[kernels]')"


def probe() -> Probe:
    if importlib.util.find_spec("liger_kernel") is None:
        return Probe(False, NOT_INSTALLED)
    if importlib.util.find_spec("triton") is None:
        return Probe(False, "triton is not installed (liger-kernel's kernels are Triton kernels)")
    import torch

    # is_available() and device_count() ask the driver without creating a CUDA context.
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return Probe(False, "no CUDA device visible to torch (liger-kernel's Triton kernels run on GPUs)")
    return Probe(True, f"liger-kernel {_version('liger-kernel')}, triton {_version('triton')}, "
                       f"{torch.cuda.device_count()} CUDA device(s)")


def _version(distribution: str) -> str:
    """The installed version, or "not installed"; the import name may come from another
    distribution (liger-kernel-nightly, pytorch-triton), which reads as "(version unknown)"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        module = distribution.replace("-", "_")
        return "(version unknown)" if importlib.util.find_spec(module) else "not installed"


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        # Above torch (100), below te (200): installed on a CUDA machine without Transformer
        # Engine, auto builds these four components with Liger and the rest with torch. Where te
        # is available its chain is te, then its declared fallback torch, so Liger does not
        # displace te's fused norm + projection modules; name it to use it there.
        priority=150,
        device_types=("cuda",),
        probe=probe,
        description="Liger-Kernel Triton kernels: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy",
    )]


def _factory(target: str):
    """A factory that imports ``"module:attr"`` of this package only when a runtime builds it.
    Registered as a callable, not as the string itself: the conformance kit resolves every
    string registration, and these modules import liger_kernel, absent on CPU machines."""
    module_name, _, attr = target.partition(":")

    def build(spec, ctx):
        return getattr(importlib.import_module(f"crosschip_liger.{module_name}"), attr)(spec, ctx)

    build.__qualname__ = f"build[{target}]"
    return build


@hookimpl
def crosschip_register_components():
    return [
        # Offsets are handled (Gemma's 1 + weight: Liger's offset with its "gemma" casting).
        ComponentImpl(NAME, "rms_norm", _factory("norm:RMSNorm"), f"{_SUPPORT}:rms_norm", handles=("offset",)),
        ComponentImpl(NAME, "gated_mlp", _factory("mlp:GatedMLP"), f"{_SUPPORT}:gated_mlp"),
        ComponentImpl(NAME, "rotary", _factory("rotary:Rotary"), f"{_SUPPORT}:rotary"),
        ComponentImpl(NAME, "loss", _factory("loss:FusedLinearCrossEntropyLoss"), f"{_SUPPORT}:loss"),
    ]


@hookimpl
def crosschip_register_layouts():
    return [
        LayoutImpl(NAME, "rms_norm", f"{_LAYOUT}:rms_norm_layout"),
        LayoutImpl(NAME, "gated_mlp", f"{_LAYOUT}:gated_mlp_layout"),
    ]


@hookimpl
def crosschip_environment_info():
    return {name: _version(name) for name in ("crosschip-liger", "liger-kernel", "triton")}
