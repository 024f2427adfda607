"""``rms_norm`` on Liger's RMSNorm kernel (``liger_kernel.transformers.rms_norm.LigerRMSNorm``)."""

from __future__ import annotations

import torch
from liger_kernel.transformers.rms_norm import LigerRMSNorm


class RMSNorm(LigerRMSNorm):
    """Liger's RMSNorm, set up to compute what the reference computes:

    - no offset: casting mode ``"llama"`` (normalise in float32, scale by the weight in the
      input dtype), as transformers' LlamaRMSNorm;
    - an offset (Gemma's ``1 + weight``): Liger's ``offset`` with casting mode ``"gemma"`` (all
      in float32, cast once at the end), as Gemma's RMSNorm.

    ``in_place=False``: Liger's default writes the input gradient over the output gradient, which
    is the residual stream's gradient too wherever the norm's output is added to the residual
    (Gemma's and OLMo-2's post-norms), so that gradient would be corrupted."""

    def __init__(self, spec, ctx=None):
        super().__init__(spec.hidden_size, eps=spec.eps, offset=float(spec.offset),
                         casting_mode="gemma" if spec.offset else "llama", in_place=False)
        with torch.no_grad():  # scale by one at initialisation, as the reference
            self.weight.fill_(1.0 - spec.offset)
