"""Rotary position embedding helpers shared by backends: frequencies come from transformers'
own initialisers (every rope type it supports), never re-derived here."""

from __future__ import annotations

from typing import NamedTuple

import torch

from crosschip.specs import RopeSpec


class RopeTables(NamedTuple):
    cos: torch.Tensor  # [batch, seq, head_dim]
    sin: torch.Tensor


def rope_inverse_frequencies(spec: RopeSpec, device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` for ``spec``, from transformers' initialisers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(spec.parameters)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        dim = int(spec.head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported by this transformers version; "
                         f"supported: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    if spec.config is None:
        raise ValueError(f"rope_type {rope_type!r} needs the Hugging Face config on RopeSpec.config")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](spec.config, device)
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, tables: RopeTables):
    """Rotate ``[batch, seq, heads, head_dim]`` q and k."""
    cos, sin = tables.cos.unsqueeze(2), tables.sin.unsqueeze(2)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
