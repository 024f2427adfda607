"""Which specs the liger backend builds, and why it declines the others. Pure Python (imports
neither liger_kernel nor triton), so the reasons can be read, and tested, on any machine; crosschip
asks them only where the backend is available.

Each function returns None to build the spec or the reason to decline it; the next backend in the
chain then builds it and the reason is recorded on ``runtime.report``.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: The widest row Liger's row kernels take: ``liger_kernel.ops.utils.calculate_settings`` raises
#: past a block of 65536 elements (RMSNorm's hidden size, SwiGLU's intermediate size).
MAX_ROW = 65536
#: Activations ``LigerFusedGateUpSiLUMulFunction`` computes: SiLU (transformers names it both).
SILU = ("silu", "swish")


def _common(ctx) -> str | None:
    tp = ctx.parallel.tp
    if tp > 1:
        return (f"tensor parallelism (tp={tp}): crosschip-liger builds single-device modules and has no "
                "parallel plan for them (Liger's kernels gather DTensor inputs whole); the torch or te "
                "backend shards its own")
    if ctx.dtype not in _DTYPES:
        return (f"dtype {ctx.dtype}: crosschip-liger builds Liger's Triton kernels for bfloat16, float16 "
                "and float32 only (they compute in float32 at most)")
    return None


def _row(what: str, size: int) -> str | None:
    if size > MAX_ROW:
        return (f"{what} {size}: Liger's kernels hold a whole row in one Triton block of at most "
                f"{MAX_ROW} elements")
    return None


def rms_norm(spec, ctx) -> str | None:
    # Any offset: Liger's ``offset`` argument with its "gemma" casting mode scales by
    # (offset + weight) in float32, as the reference does for offset norms.
    return _common(ctx) or _row("hidden size", spec.hidden_size)


def gated_mlp(spec, ctx) -> str | None:
    if spec.activation not in SILU:
        return (f"activation {spec.activation!r}: crosschip-liger builds Liger's SwiGLU kernel "
                f"(LigerFusedGateUpSiLUMulFunction), which gates with SiLU only ({', '.join(SILU)})")
    return _common(ctx) or _row("intermediate size", spec.intermediate_size)


def rotary(spec, ctx) -> str | None:
    # Liger's RoPE kernel takes cos and sin tables, so every rope type whose tables the reference
    # builds (scaled ones included: llama3, yarn, longrope, dynamic) and partial rotary factors
    # run on it. A rope type this transformers does not know has no tables at all.
    from crosschip.modeling.rope import rope_inverse_frequencies

    try:
        rope_inverse_frequencies(spec)
    except ValueError as exc:
        return str(exc)
    return _common(ctx)


def loss(spec, ctx) -> str | None:
    # What the LM head needs (tied, bias, soft-capping, a logits divisor, adapters) is known only
    # at call time: the module computes unfused where it cannot fuse (see loss.py).
    return _common(ctx)
