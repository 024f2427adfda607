"""``loss`` as Liger's fused linear cross-entropy (``LigerFusedLinearCrossEntropyLoss``): the LM
head's matmul and the cross-entropy run chunk by chunk over the tokens, so the ``[tokens, vocab]``
logits (and their float32 copy and gradient) never exist whole; at a 128k vocabulary they are the
largest tensors of a small model's step. Liger computes the gradients of the hidden states and of
the head's weight in the forward pass, and the backward pass only scales them.

crosschip's call contract makes this possible: a model calls ``loss(hidden, labels, lm_head,
logits)`` with the LM head module, so the loss can read the head's weight itself.
"""

from __future__ import annotations

import torch
from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

from crosschip.lora.sites import SITES
from crosschip.reference.components import CausalLMLoss as ReferenceCausalLMLoss
from crosschip.reference.components import LMHead as ReferenceLMHead


class FusedLinearCrossEntropyLoss(ReferenceCausalLMLoss):
    """Mean next-token cross-entropy (labels shifted here, as the reference) with the LM head fused
    in, where the head is one Liger can compute: a reference-style head (the reference's or the
    torch backend's ``LMHead``: ``output_weight()``, tied or not, bias, soft-capping) without a
    logits divisor or adapters, whose weight is a plain CUDA tensor of the hidden states' dtype.

    Everything else takes the reference path, computing the logits with the head: logits the
    model already made (``logits`` given; Liger's plain cross-entropy kernel would write the
    gradient over them, and the caller holds them), a Granite-style divisor, LoRA adapters on the
    head, a sharded weight (FSDP's between its gathers).

    Weight gradients accumulate over the token chunks in float32 (``accum_dtype``), rounded to the
    weight's dtype once, as a single matmul's would be; Liger's default accumulates in the
    weight's dtype, adding a rounding per chunk. One difference at the edge: a batch whose
    targets are all ignored has loss 0 here, where the reference's mean over nothing is NaN.
    """

    def __init__(self, spec, ctx=None):
        super().__init__(spec)
        self._fused: dict[float | None, LigerFusedLinearCrossEntropyLoss] = {}

    def forward(self, hidden, labels, lm_head, logits=None) -> torch.Tensor:
        if logits is not None or not self.fusable(hidden, lm_head):
            return super().forward(hidden, labels, lm_head, logits)
        return self._fused_loss(hidden, labels, lm_head)

    # Run eagerly under torch.compile (compile=True compiles the loss): Liger's kernel computes the
    # gradients inside its forward, chunk by chunk, which does not trace.
    @torch.compiler.disable
    def _fused_loss(self, hidden, labels, lm_head) -> torch.Tensor:
        targets = self.shift(labels).to(hidden.device).reshape(-1)
        fused = self._loss(lm_head.spec.softcap)
        return fused(lm_head.output_weight(), hidden.reshape(-1, hidden.shape[-1]), targets, lm_head.bias)

    def _loss(self, softcap: float | None) -> LigerFusedLinearCrossEntropyLoss:
        if softcap not in self._fused:
            self._fused[softcap] = LigerFusedLinearCrossEntropyLoss(
                ignore_index=self.spec.ignore_index, reduction="mean", softcap=softcap,
                accum_dtype=torch.float32)
        return self._fused[softcap]

    @staticmethod
    def fusable(hidden, lm_head) -> bool:
        """Whether Liger's kernel computes exactly what ``lm_head`` followed by the reference loss
        would (see the class docstring for what it cannot)."""
        if not isinstance(lm_head, ReferenceLMHead) or getattr(lm_head, SITES, None):
            return False
        if lm_head.spec.logits_divisor != 1.0 or type(hidden) is not torch.Tensor or not hidden.is_cuda:
            return False
        weight, bias = lm_head.output_weight(), lm_head.bias
        params = [t for t in (weight, bias) if t is not None]
        # Liger computes the head's gradients only together with the hidden states' (its forward
        # skips them all when the input needs none), so a trainable head over a frozen body
        # would get no gradient.
        if torch.is_grad_enabled() and not hidden.requires_grad and any(t.requires_grad for t in params):
            return False
        # Plain tensors only: Liger's chunked matmuls take local tensors, not a sharded DTensor.
        return (all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in params)
                and all(t.device == hidden.device and t.dtype == hidden.dtype for t in params))
