"""Which specs the neuron backend builds, and why it declines the others. Pure Python: nothing
here imports neuronx-distributed, so a strict-mode error can explain a decline anywhere."""

from __future__ import annotations

import torch

from crosschip_neuron import cpu_mode

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _common(ctx) -> str | None:
    kind = ctx.device.type
    if kind == "cpu" and not cpu_mode.cpu_mode_requested():
        return (f"device 'cpu' runs neuronx-distributed only in its CPU mode, which is off "
                f"(set {cpu_mode.CPU_MODE}=1)")
    if kind == "xla" and (cpu_mode.cpu_mode_requested() or not cpu_mode.sdk_installed()):
        return (f"device 'xla' needs the Neuron SDK (torch_neuronx, torch_xla) and {cpu_mode.CPU_MODE} "
                "unset; this process has " + ("NxD's CPU mode on" if cpu_mode.cpu_mode_requested()
                                              else "no Neuron SDK"))
    if ctx.dtype not in _DTYPES:
        return f"dtype {ctx.dtype} is not supported by neuronx-distributed's layers (float32, bfloat16, float16)"
    if ctx.parallel.dp != 1:
        return f"{ctx.parallel}: data parallelism (dp) is not implemented on the neuron backend"
    return None


def projection(spec, ctx) -> str | None:
    return _common(ctx)


def out_projection(spec, ctx) -> str | None:
    if spec.parallel != "row":
        return f"only the row-parallel attention output projection is built here, not parallel={spec.parallel!r}"
    if ctx.parallel.tp > 1 and spec.in_features % ctx.parallel.tp:
        return f"tp={ctx.parallel.tp} does not divide the input features ({spec.in_features})"
    return _common(ctx)


def gated_mlp(spec, ctx) -> str | None:
    return _common(ctx)


def vocabulary(spec, ctx) -> str | None:
    """Embedding and LM head: NxD splits the vocabulary in equal ranges."""
    tp = ctx.parallel.tp
    if spec.vocab_size % tp:
        return f"tp={tp} does not divide the vocabulary ({spec.vocab_size}); NxD shards it in equal ranges"
    return _common(ctx)
