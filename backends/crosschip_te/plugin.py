"""Hook implementations of the ``te`` backend. Registration and the availability probe are cheap:
nothing here imports transformer_engine or initialises CUDA."""

from __future__ import annotations

import importlib.util

from crosschip import BackendDescriptor, Probe, hookimpl

NAME = "te"


def probe() -> Probe:
    if importlib.util.find_spec("transformer_engine") is None:
        return Probe(False, "transformer_engine is not installed (pip install 'crosschip[te]' on a CUDA machine)")
    import torch

    # device_count() asks the driver (NVML where present) without creating a CUDA context.
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return Probe(False, "no CUDA device visible to torch")
    return Probe(True, f"transformer_engine importable, {torch.cuda.device_count()} CUDA device(s)")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=200,
        device_types=("cuda",),
        probe=probe,
        fallbacks=("torch",),
        description="Transformer Engine: fused norm+linear, fused attention, FP8",
    )]


@hookimpl
def crosschip_register_components():
    # Transformer Engine components arrive with the TE backend issue; until then every
    # component falls back along the chain (torch, then reference).
    return []


@hookimpl
def crosschip_environment_info():
    spec = importlib.util.find_spec("transformer_engine")
    return {"transformer_engine": "installed" if spec else "not installed"}
