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
    (non-zero when keys include cached tokens).
    """

    padding: torch.Tensor | None = None
    q_offset: int = 0


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
    return result
