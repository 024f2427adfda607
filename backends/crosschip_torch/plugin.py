"""Hook implementations of the ``torch`` backend (entry point ``crosschip.backends: torch``)."""

from __future__ import annotations

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl

NAME = "torch"
_MOD = "crosschip_torch.components"
_LAYOUT = "crosschip_torch.layout"


def probe() -> Probe:
    # Plain torch: available wherever torch imports; CUDA is used when the runtime asks for it.
    return Probe(True, "plain torch (CPU and CUDA)")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=100,
        device_types=("cpu", "cuda"),
        probe=probe,
        description="combined QKV / gate_up projections, SDPA attention, DTensor parallelism",
    )]


@hookimpl
def crosschip_register_components():
    return [
        ComponentImpl(NAME, "qkv_projection", lambda spec, ctx: _cls("CombinedQKV")(spec)),
        ComponentImpl(NAME, "gated_mlp", lambda spec, ctx: _cls("GatedMLP")(spec)),
        ComponentImpl(NAME, "out_projection", lambda spec, ctx: _cls("Linear")(spec)),
        ComponentImpl(NAME, "attention", lambda spec, ctx: _cls("SDPAAttention")(spec)),
    ]


@hookimpl
def crosschip_register_layouts():
    return [
        LayoutImpl(NAME, "qkv_projection", f"{_LAYOUT}:qkv_layout"),
        LayoutImpl(NAME, "gated_mlp", f"{_LAYOUT}:gated_mlp_layout"),
        LayoutImpl(NAME, "out_projection", f"{_LAYOUT}:identity_layout"),
    ]


@hookimpl
def crosschip_environment_info():
    import torch

    return {"torch": torch.__version__, "cuda": str(torch.cuda.is_available())}


def _cls(name: str):
    import importlib

    return getattr(importlib.import_module(_MOD), name)
