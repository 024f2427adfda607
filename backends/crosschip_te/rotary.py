"""Rotary embedding with Transformer Engine's fused RoPE kernel: one kernel per tensor forward
and one backward, against the half-dozen elementwise kernels of the rotate-half formula.

TE's kernel takes rotation angles (``[seq, 1, 1, rot_dim]``, float32) shared by every sequence of
the batch and computes sin and cos itself, in float32, rounding once. So it covers the common
case: positions shared across the batch (``position_ids`` of batch 1, which the decoder builds
when none are given, in training and in a generation's cached steps). Per-sequence positions
(left-padded generation) take the reference formula; rope types that scale cos and sin are
declined in :mod:`crosschip_te.support`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb

from crosschip.reference.components import Rotary as ReferenceRotary
from crosschip.modeling.rope import RopeTables, per_forward_inverse_frequencies


class RopeAngles(NamedTuple):
    """Rotation angles ``[seq, 1, 1, rot_dim]`` (float32), shared by every row of the batch."""

    angles: torch.Tensor


class Rotary(ReferenceRotary):
    def __init__(self, spec, ctx):
        super().__init__(spec)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeAngles | RopeTables:
        if position_ids.shape[0] != 1 or position_ids.device.type != "cuda":
            return super().forward(position_ids, dtype)
        inv_freq = per_forward_inverse_frequencies(self.spec, self.inv_freq, self.long_inv_freq, position_ids)
        freqs = position_ids[0, :, None].float() * inv_freq.float()
        # The same [f_0..f_{d/2}, f_0..f_{d/2}] order as the reference tables: rotate-half pairs.
        return RopeAngles(torch.cat((freqs, freqs), dim=-1)[:, None, None, :])

    def apply(self, q: torch.Tensor, k: torch.Tensor, tables):
        if not isinstance(tables, RopeAngles):
            return super().apply(q, k, tables)
        # Strided q/k views (split from the QKV output) are read in place; outputs are contiguous.
        return (apply_rotary_pos_emb(q, tables.angles, tensor_format="bshd", fused=True),
                apply_rotary_pos_emb(k, tables.angles, tensor_format="bshd", fused=True))
