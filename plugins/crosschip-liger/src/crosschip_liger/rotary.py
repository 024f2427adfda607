"""``rotary`` on Liger's RoPE kernel (``liger_kernel.ops.LigerRopeFunction``): one kernel rotates
q and k together, forward and backward, where the rotate-half formula launches about a dozen.

The tables are the reference's (transformers' rope initialisers, every rope type, cos and sin
already scaled where the type scales them), built in float32 whatever the activations' dtype:
Liger's kernel computes in the tables' dtype, so q and k are rotated in float32 and rounded once.
Partial rotary factors work as they are: the kernel rotates the first ``cos.shape[-1]`` features
of each head and leaves the rest.
"""

from __future__ import annotations

import torch
from liger_kernel.ops import LigerRopeFunction

from crosschip.modeling.rope import RopeTables
from crosschip.reference.components import Rotary as ReferenceRotary


class Rotary(ReferenceRotary):
    def __init__(self, spec, ctx=None):
        super().__init__(spec)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        # [batch or 1, seq, rotary_dim]: Liger reads one table row per (sequence, position), or
        # the same rows for every sequence when the batch dimension is 1.
        return super().forward(position_ids, torch.float32)

    def apply(self, q: torch.Tensor, k: torch.Tensor, tables: RopeTables):
        # Liger rotates whatever contiguous [batch, seq, heads, head_dim] storage it is handed, in
        # place (it copies only non-contiguous inputs): give it a copy of a contiguous q or k, so
        # the caller's tensors (a projection's output, a test's leaf) are never overwritten.
        q = q.clone() if q.is_contiguous() else q
        k = k.clone() if k.is_contiguous() else k
        # Liger's layout is [batch, heads, seq, head_dim]; these transposes are views.
        q_out, k_out = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), tables.cos, tables.sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
