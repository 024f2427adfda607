"""Physical layouts of the liger backend, as exactly reversible transforms from the canonical
(Hugging Face) roles, built from ``crosschip.weights.layouts``.

The gated MLP holds gate and up as the two halves of one ``gate_up_proj`` (one matmul), because
that is the tensor Liger's ``LigerFusedGateUpSiLUMulFunction`` reads: gate in the first
``intermediate_size`` columns of each row, up in the rest. The RMSNorm's ``weight`` is the
canonical role itself.
"""

from __future__ import annotations

from crosschip.weights.layouts import IDENTITY, Chain, Concat, Rename


def gated_mlp_layout(spec, ctx=None):
    halves = (spec.intermediate_size, spec.intermediate_size)
    return Chain.of(
        Concat(("gate.weight", "up.weight"), "gate_up_proj.weight", halves),
        Concat(("gate.bias", "up.bias"), "gate_up_proj.bias", halves),
        Rename.of(**{"down.weight": "down_proj.weight", "down.bias": "down_proj.bias"}),
    )


def rms_norm_layout(spec, ctx=None):
    return IDENTITY
