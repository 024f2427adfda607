"""The modules of the ``layer_scale`` kind: the reference (test oracle) and the backend's own."""

from __future__ import annotations

import torch
from torch import nn


class ReferenceLayerScale(nn.Module):
    """``weight * x``, written out."""

    def __init__(self, spec):
        super().__init__()
        self.weight = nn.Parameter(torch.full((spec.hidden_size,), float(spec.init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


class Float32LayerScale(nn.Module):
    """The backend's implementation: the product in float32, cast back (what a device kernel
    that upcasts would do). Holds its weight as ``gamma``, so its layout is a rename."""

    def __init__(self, spec, ctx=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((spec.hidden_size,), float(spec.init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x.float(), self.gamma.float()).to(x.dtype)
