"""The template backend's modules and the checks that decide which specs it accepts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crosschip.specs import NormSpec


def supports_rms_norm(spec: NormSpec, ctx) -> str | None:
    """None to build ``spec``, or the reason to decline (recorded on ``runtime.report``)."""
    if ctx.dtype == torch.float64:
        # F.rms_norm normalises float64 in float64; transformers' RMSNorm (and the reference
        # backend) normalise in float32 whatever the input dtype. Declining keeps parity.
        return ("float64: torch.nn.functional.rms_norm normalises in float64, not in float32 as "
                "transformers' RMSNorm does")
    return None


class FusedRMSNorm(nn.Module):
    """RMSNorm through torch's native ``torch.nn.functional.rms_norm`` (``aten::rms_norm``), one
    call instead of the reference's expression written out in Python. ATen picks the kernel: a
    fused one where the device has it, its composite decomposition (upcasting to float32)
    elsewhere, as on CPU with autograd. A real backend puts its device kernel here."""

    def __init__(self, spec: NormSpec, ctx=None):
        super().__init__()
        self.normalized_shape = (spec.hidden_size,)
        self.eps = spec.eps
        # Named ``weight`` like the Hugging Face tensor, so the layout is the identity.
        self.weight = nn.Parameter(torch.ones(spec.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}"
