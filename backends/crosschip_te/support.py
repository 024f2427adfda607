"""Which specs the te backend builds, and why it declines the others. Pure Python (no CUDA), so
strict-mode errors can explain a decline; rotary and loss also ask the installed Transformer
Engine whether it has the kernel they need (asked only where te is available)."""

from __future__ import annotations

import torch

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _common(ctx) -> str | None:
    if ctx.dtype not in _DTYPES:
        return f"dtype {ctx.dtype} is not supported by Transformer Engine (bf16, fp16, fp32)"
    return None


def _fp8_dims(ctx, *dims) -> str | None:
    if ctx.runtime.precision == "fp8":
        bad = [d for d in dims if d % 16]
        if bad:
            return f"FP8 GEMMs need dimensions divisible by 16, found {bad}"
    return None


def _input_norm(spec) -> str | None:
    """The fused norm here is TE's RMSNorm with a plain weight."""
    norm = spec.input_norm
    if norm is None:
        return None
    from crosschip.specs import NormSpec

    if not isinstance(norm, NormSpec):
        return f"the fused input norm is an RMSNorm here, not {type(norm).__name__}"
    return _rms_variant(norm)


def _rms_variant(spec) -> str | None:
    if spec.offset:
        return (f"RMSNorm offset {spec.offset} (Gemma's 1 + weight) is not built here (TE's "
                "zero_centered_gamma is not wired up)")
    if spec.scope == "projection":
        return "a projection-wide RMSNorm (scope='projection') is not built here"
    return None


def qkv(spec, ctx):
    rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    return _input_norm(spec) or _common(ctx) or _fp8_dims(ctx, spec.hidden_size, rows)


def gated_mlp(spec, ctx):
    if spec.input_norm is None:
        return "TE's fused LayerNormMLP needs an input norm; this spec has none"
    reason = _input_norm(spec)
    if reason:
        return reason
    if spec.activation not in ("silu", "swish"):
        return f"activation {spec.activation!r} is not fused here (only SwiGLU: silu)"
    return _common(ctx) or _fp8_dims(ctx, spec.hidden_size, spec.intermediate_size)


def linear(spec, ctx):
    return _common(ctx) or _fp8_dims(ctx, spec.in_features, spec.out_features)


def rms_norm(spec, ctx):
    reason = _rms_variant(spec)
    if reason:
        return reason
    if spec.hidden_size % 8:
        return f"TE RMSNorm kernels need a hidden size divisible by 8, found {spec.hidden_size}"
    return _common(ctx)


def attention(spec, ctx):
    if spec.softcap is not None:
        return "TE's fused attention has no logit soft-capping"
    if ctx.dtype == torch.float32:
        return "TE fused attention runs in bf16/fp16 only; dtype is float32"
    if spec.head_dim % 8 or spec.head_dim > 256:
        return f"TE fused attention needs head_dim divisible by 8 and <= 256, found {spec.head_dim}"
    return None


def rotary(spec, ctx):
    from crosschip.modeling.rope import rope_inverse_frequencies

    try:
        _, scaling = rope_inverse_frequencies(spec)
    except ValueError as exc:  # a rope type this transformers lacks: the reference says why too
        return str(exc)
    if scaling != 1.0:
        return (f"rope_type {spec.rope_type!r} scales cos and sin by {scaling:.6g}; TE's fused RoPE "
                "computes them from the angles alone")
    try:  # where this Transformer Engine keeps it (its attention package since 2.x)
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb  # noqa: F401
    except ImportError as exc:
        return f"this Transformer Engine has no fused RoPE at transformer_engine.pytorch.attention.rope: {exc}"
    return _common(ctx)


def loss(spec, ctx):
    reason = _common(ctx)
    if reason is not None:
        return reason
    import inspect

    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy
    except ImportError as exc:
        return f"transformer_engine.pytorch.cross_entropy cannot be imported: {exc}"
    # Before the kernel that saves softmax statistics (the version that added overwrite_input),
    # TE's forward wrote the gradient over the logits, which would corrupt logits the model
    # returns to its caller.
    if "overwrite_input" not in inspect.signature(parallel_cross_entropy).parameters:
        return ("this Transformer Engine's fused cross-entropy overwrites the logits in its forward "
                "(it predates the overwrite_input option); the reference loss keeps them intact")
    return None
