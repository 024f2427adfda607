"""``gated_mlp`` with Liger's SwiGLU kernel over one fused gate/up projection."""

from __future__ import annotations

import torch
from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction
from torch import nn


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``: one ``gate_up_proj`` matmul whose output rows hold gate
    then up (``layout.gated_mlp_layout``), then ``LigerFusedGateUpSiLUMulFunction``, which reads
    both halves in place (no split copies) and computes SiLU in float32, one kernel each way where
    eager torch launches a SiLU, a multiply and their backwards."""

    def __init__(self, spec, ctx=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in_place=False: the backward must not overwrite the saved gate_up activation (a
        # retained graph or activation recomputation would read gradients instead).
        # Rows flattened to 2-D: Liger 0.8.5's backward returns its gradient as [rows, 2 x width]
        # whatever the input's leading shape, which autograd refuses for a [batch, seq, ...] input.
        gate_up = self.gate_up_proj(x)
        hidden = LigerFusedGateUpSiLUMulFunction.apply(gate_up.reshape(-1, gate_up.shape[-1]), False)
        return self.down_proj(hidden.reshape(*gate_up.shape[:-1], -1))
