"""Next-token cross-entropy with Transformer Engine's fused kernel (``parallel_cross_entropy``):
one pass over the bf16 logits computes the loss and the softmax statistics in float32, and the
backward writes the logits' gradient directly. The unfused loss casts the ``[tokens, vocab]``
logits to float32 and runs log-softmax, NLL and their backwards over that copy: at a 128k
vocabulary the largest memory traffic of a small model's step."""

from __future__ import annotations

import torch
from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

from crosschip.reference.components import CausalLMLoss as ReferenceCausalLMLoss

_FUSED_DTYPES = (torch.bfloat16, torch.float32)


class CausalLMLoss(ReferenceCausalLMLoss):
    """The reference loss (mean over non-ignored targets) through TE's kernel where it applies:
    CUDA logits of bf16 or float32 held whole on this rank. Anything else (a vocab-sharded DTensor
    from another backend's parallel plan, float16) takes the reference path.

    One difference at the edge: a batch whose targets are all ignored has loss 0 here (TE counts
    at least one target), where the reference's mean over nothing is NaN."""

    def __init__(self, spec, ctx):
        super().__init__(spec)

    def forward(self, hidden, labels, lm_head, logits=None) -> torch.Tensor:
        # Logits made here are seen by no one else, so TE may reuse their memory for the gradient.
        own = logits is None
        if own:
            logits = lm_head(hidden)
        targets = self.shift(labels).to(logits.device)
        if not self._fusable(logits):
            return self.cross_entropy(logits, targets)
        if logits.dim() != 3:
            logits = logits.reshape(1, -1, logits.shape[-1])
        loss = parallel_cross_entropy(logits, targets.reshape(-1), reduce_loss=True,
                                      ignore_idx=self.spec.ignore_index,
                                      overwrite_input=own and logits.is_contiguous())
        return loss.reshape(())  # TE returns shape [1]; a loss is a scalar

    @staticmethod
    def _fusable(logits) -> bool:
        return type(logits) is torch.Tensor and logits.is_cuda and logits.dtype in _FUSED_DTYPES
