"""Physical layouts of the template backend, as reversible transforms from the canonical (Hugging
Face) roles of each component; see ``crosschip.weights.layouts`` for the vocabulary (Rename, Concat,
InterleaveQKV, InterleaveRows, Chain)."""

from __future__ import annotations

from crosschip.weights.layouts import IDENTITY


def rms_norm_layout(spec, ctx=None):
    # FusedRMSNorm names its parameter ``weight``, exactly the canonical role.
    return IDENTITY
