"""Which keys each query may attend to: shared by every attention implementation, so causal,
sliding-window and padding semantics are defined once."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMask:
    """Per-batch attention inputs beyond q, k and v.

    ``padding``: bool ``[batch, kv_len]``, True for real tokens (Hugging Face's attention_mask),
    or None when every token is real. ``q_offset``: index of the first query within the keys
    (non-zero when keys include cached tokens): an int, or a 0-dim integer tensor on the model's
    device when a static cache gives it (the keys are then its whole preallocated buffer, and
    the causal structure hides the slots not written yet, so a compiled decode step sees the
    same shapes and no host value at every position). ``documents``: int ``[batch, kv_len]``, the
    document each position belongs to in a packed sequence (attention stays within a document),
    or None for one document per row.
    """

    padding: torch.Tensor | None = None
    q_offset: int | torch.Tensor = 0
    documents: torch.Tensor | None = None

    @property
    def is_plain(self) -> bool:
        """Nothing beyond the causal (or sliding-window) structure of the spec: no padding, no
        cached keys, no packed documents; what fused kernels handle without an explicit mask."""
        return (self.padding is None and isinstance(self.q_offset, int) and self.q_offset == 0
                and self.documents is None)


def allowed(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    sliding_window: int | None,
    mask: AttentionMask | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Bool ``[batch or 1, 1, q_len, kv_len]``: True where query i may attend to key j; None when
    every query sees every key."""
    offset = mask.q_offset if mask is not None else 0
    result = None
    if causal or sliding_window is not None:
        q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
        k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
        result = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        if causal:
            result = result & (k_pos <= q_pos)
        if sliding_window is not None:
            # Hugging Face semantics: a window of W keeps the W most recent keys, itself included.
            result = result & (k_pos > q_pos - sliding_window)
        result = result[None, None]
    if mask is not None and mask.padding is not None:
        pad = mask.padding.to(device=device, dtype=torch.bool)[:, None, None, :]
        result = pad if result is None else result & pad
    if mask is not None and mask.documents is not None:
        docs = mask.documents.to(device=device)
        same = docs[:, None, offset:offset + q_len, None] == docs[:, None, None, :]
        result = same if result is None else result & same
    return result


def itself(q_len: int, kv_len: int, mask: AttentionMask | None, device: torch.device) -> torch.Tensor:
    """Bool ``[q_len, kv_len]``: True where key j is query i's own position."""
    offset = mask.q_offset if mask is not None else 0
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
    return torch.arange(kv_len, device=device).unsqueeze(0) == q_pos


def sdpa(q, k, v, spec, mask: AttentionMask | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``q [batch, seq, heads, head_dim]`` over ``k``, ``v [batch, kv_seq, kv_heads,
    head_dim]`` with ``scaled_dot_product_attention`` (native GQA), returning ``[batch, seq,
    heads * head_dim]``; an explicit boolean mask only when the spec or the batch needs one
    (sliding window, padding, cached keys). Shared by backends whose own kernels do not cover
    every case."""
    import torch.nn.functional as F

    batch, q_len = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    simple = (mask is None or mask.is_plain) and spec.sliding_window is None
    attn_mask = None
    if not simple:
        attn_mask = allowed(q_len, k.shape[2], causal=spec.causal, sliding_window=spec.sliding_window,
                            mask=mask, device=q.device)
        # A query that may see no key (left padding) would give NaN; let it see itself. Its
        # output is discarded by the caller, but NaN would poison gradients, and the keys and
        # values computed from it, which a cache keeps (masked later, yet 0 * NaN is NaN).
        if attn_mask is not None:
            attn_mask = attn_mask | itself(q_len, k.shape[2], mask, q.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=spec.causal and simple and q_len > 1,
        scale=spec.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(batch, q_len, -1)

