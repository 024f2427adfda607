"""The te backend's physical layouts: the parameter names Transformer Engine modules hold,
reached from canonical roles by reversible transforms (plain tensor functions, testable on CPU)."""

from __future__ import annotations

from crosschip.weights.layouts import Chain, InterleaveBlocks, Rename, grouped_qkv
from crosschip.specs import GatedMLPSpec, LayerNormSpec, LinearSpec, MLPSpec, NormSpec, QKVSpec



def _fused_norm(prefix: str) -> dict[str, str]:
    """A fused input norm inside TE's LayerNormLinear / LayerNormMLP at ``prefix``: its weight,
    and a LayerNorm's bias."""
    return {"norm.weight": f"{prefix}.layer_norm_weight", "norm.bias": f"{prefix}.layer_norm_bias"}


def qkv_layout(spec: QKVSpec, ctx=None):
    # Grouped as the torch backend's (KV heads replicated where tp exceeds them), inside TE's
    # LayerNormLinear, which also holds the fused input norm.
    tp = ctx.parallel.tp if ctx is not None else 1
    return Chain.of(*grouped_qkv(spec, tp, "proj.weight", "proj.bias"),
                    Rename.of(**_fused_norm("proj")))


def gated_mlp_layout(spec: GatedMLPSpec, ctx=None):
    # TE's SwiGLU gates the first half of fc1's output, and under tensor parallelism it halves
    # each rank's local output: so fc1 is [gate_r; up_r] per rank, concatenated over the ranks
    # (a dim-0 shard then holds its own pair). At tp=1 that is plain [gate; up].
    tp = ctx.parallel.tp if ctx is not None else 1
    return Chain.of(
        InterleaveBlocks("gate.weight", "up.weight", "mlp.fc1_weight", tp),
        InterleaveBlocks("gate.bias", "up.bias", "mlp.fc1_bias", tp),
        Rename.of(**{"down.weight": "mlp.fc2_weight", "down.bias": "mlp.fc2_bias", **_fused_norm("mlp")}),
    )


def mlp_layout(spec: MLPSpec, ctx=None):
    # Not gated: up is TE's fc1 (column-parallel under tp, a plain dim-0 shard), down its fc2.
    return Rename.of(**{"up.weight": "mlp.fc1_weight", "up.bias": "mlp.fc1_bias",
                        "down.weight": "mlp.fc2_weight", "down.bias": "mlp.fc2_bias", **_fused_norm("mlp")})


def linear_layout(spec: LinearSpec, ctx=None):
    return Rename.of(**{"weight": "proj.weight", "bias": "proj.bias"})


def rms_norm_layout(spec: NormSpec, ctx=None):
    # With an offset the stored weight is already the difference from one, as TE's
    # zero_centered_gamma holds it: no transform of the values.
    return Rename.of(**{"weight": "norm.weight"})


def layer_norm_layout(spec: LayerNormSpec, ctx=None):
    return Rename.of(**{"weight": "norm.weight", "bias": "norm.bias"})
