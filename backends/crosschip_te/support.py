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


#: transformers' activation names -> TE's LayerNormMLP activation of the same function (TE's
#: kernels, transformer_engine/common/util/math.h): TE's "gelu" is the tanh approximation
#: ``x * (0.5 + 0.5 * tanh(x * (0.79788456 + 0.03567741 * x^2)))``, transformers' gelu_pytorch_tanh,
#: gelu_new, gelu_fast and gelu_python_tanh; "qgelu" is ``x * sigmoid(1.702 x)`` (quick_gelu);
#: "srelu" is ``relu(x)^2`` (relu2). transformers' plain "gelu" is the exact erf GELU: no TE kernel.
PLAIN_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_python_tanh": "gelu",
    "quick_gelu": "qgelu", "relu": "relu", "relu2": "srelu", "silu": "silu", "swish": "silu",
}
#: The gated forms (TE gates with the first half of fc1's output, as the layout stores it).
GATED_ACTIVATIONS = {
    "silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu",
    "gelu_fast": "geglu", "gelu_python_tanh": "geglu", "quick_gelu": "qgeglu", "relu": "reglu",
    "relu2": "sreglu",
}


def _activation(activation: str, table: dict) -> str | None:
    if activation in table:
        return None
    if activation in ("gelu", "gelu_python"):
        return (f"activation {activation!r} is the exact (erf) GELU; Transformer Engine's gelu kernel is "
                "the tanh approximation (transformers' gelu_pytorch_tanh), so it is not built here")
    return (f"activation {activation!r} has no Transformer Engine kernel here (TE fuses "
            f"{', '.join(sorted(table))})")


def _input_norm(spec) -> str | None:
    """The fused norm: TE's RMSNorm or LayerNorm inside LayerNormLinear / LayerNormMLP."""
    norm = spec.input_norm
    return None if norm is None else norm_variant(norm)


def norm_variant(spec) -> str | None:
    """Why TE's norms cannot compute ``spec`` (an RMS or layer norm spec), or None."""
    from crosschip.specs import LayerNormSpec

    if isinstance(spec, LayerNormSpec):
        if not spec.bias:
            return ("LayerNorm without a bias: Transformer Engine's LayerNorm (and the LayerNorm of "
                    "LayerNormLinear / LayerNormMLP) always holds and adds a learned bias")
        return None
    return _rms_variant(spec)


def _rms_variant(spec) -> str | None:
    if spec.offset not in (0.0, 1.0):
        return (f"RMSNorm offset {spec.offset}: TE's zero_centered_gamma scales by exactly 1 + weight "
                "(offset 1.0), no other offset")
    if spec.scope == "projection":
        return ("a projection-wide RMSNorm (scope='projection', OLMo-2's q/k norms) is not built by te: "
                "sharded under tensor parallelism its statistics need an all-reduce over the ranks' "
                "features, which TE's RMSNorm and te's plan do not do (the torch backend's plan does)")
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
    return (_activation(spec.activation, GATED_ACTIVATIONS) or _common(ctx)
            or _fp8_dims(ctx, spec.hidden_size, spec.intermediate_size))


def mlp(spec, ctx):
    if spec.input_norm is None:
        return "TE's fused LayerNormMLP needs an input norm; this spec has none"
    return (_input_norm(spec) or _activation(spec.activation, PLAIN_ACTIVATIONS) or _common(ctx)
            or _fp8_dims(ctx, spec.hidden_size, spec.intermediate_size))


def linear(spec, ctx):
    return _common(ctx) or _fp8_dims(ctx, spec.in_features, spec.out_features)


def general_linear(spec, ctx):
    """The ``linear`` kind: te.Linear, column- or row-parallel as the spec says under tp > 1."""
    parallel = getattr(ctx, "parallel", None)
    if parallel is not None and parallel.sequence_parallel:
        return ("sequence parallelism: te's sequence-parallel stream layout ([seq / tp, batch, hidden]) "
                "is wired only for its own projections (QKV, attention output, MLPs), not a general linear")
    return linear(spec, ctx)


def layer_norm(spec, ctx):
    reason = norm_variant(spec)
    if reason:
        return reason
    if spec.hidden_size % 8:
        return f"TE LayerNorm kernels need a hidden size divisible by 8, found {spec.hidden_size}"
    return _common(ctx)


def rms_norm(spec, ctx):
    reason = _rms_variant(spec)
    if reason:
        return reason
    if spec.hidden_size % 8:
        return f"TE RMSNorm kernels need a hidden size divisible by 8, found {spec.hidden_size}"
    return _common(ctx)


def attention(spec, ctx):
    if spec.softcap is not None:
        # TE 2.20's DotProductAttention takes softcap=, but its backend selection disables the
        # fused (cuDNN) backend for it, leaving FlashAttention >= 2.6 (not a dependency here) or
        # its unfused PyTorch path: nothing faster than the torch backend's attention.
        return ("logit soft-capping: Transformer Engine's fused (cuDNN) attention does not support it "
                "(TE's DotProductAttention(softcap=) runs it only on FlashAttention >= 2.6 or its "
                "unfused PyTorch path)")
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
