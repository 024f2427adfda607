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
    layer_type = params.get("layer_type")  # one of a config's per-layer-type rope parameter sets
    extra = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](spec.config, device, **extra)
    return inv_freq.float(), float(scaling)


def per_forward_inverse_frequencies(spec: RopeSpec, base: torch.Tensor, long: torch.Tensor | None,
                                    position_ids: torch.Tensor) -> torch.Tensor:
    """Frequencies that depend on the sequence length seen by this forward, as transformers'
    ``dynamic_rope_update`` computes them for a fresh model: ``dynamic`` NTK rescales beyond
    ``max_position_embeddings``; ``longrope`` switches to its long factors beyond the original
    length. Written with tensor ops only, so tracing sees no data-dependent Python branch."""
    rope_type = spec.rope_type
    if rope_type not in ("dynamic", "longrope"):
        return base
    seq_len = position_ids.max() + 1
    if rope_type == "longrope":
        original = dict(spec.parameters)["original_max_position_embeddings"]
        return torch.where(seq_len > original, long, base)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](spec.config, base.device, seq_len=seq_len)
    return inv_freq.float()


def long_inverse_frequencies(spec: RopeSpec, device=None) -> torch.Tensor | None:
    """LongRoPE's long-context frequencies (None for other rope types)."""
    if spec.rope_type != "longrope":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = dict(spec.parameters)["original_max_position_embeddings"]
    inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](spec.config, device, seq_len=original + 1)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, tables: RopeTables):
    """Rotate ``[batch, seq, heads, head_dim]`` q and k. With a partial rotary factor the tables
    cover only the first dims; the rest pass through unrotated."""
    cos, sin = tables.cos.unsqueeze(2), tables.sin.unsqueeze(2)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_rot = (k_rot * cos) + (rotate_half(k_rot) * sin)
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)
