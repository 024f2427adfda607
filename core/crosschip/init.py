"""Backend-independent initialisation: weights are drawn in the canonical Hugging Face layout
from a seed per tensor name, then loaded through each backend's layout, so one seed gives the
same model on every backend."""

from __future__ import annotations

import hashlib

import torch

from crosschip import weights


def _seed_for(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def init_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) for matrices and embeddings, ones for norm weights, zeros for biases
    (transformers' convention for these models)."""
    for b in weights.bindings(model):
        tensors = {}
        for key, shape in b.hf_shapes.items():
            if key.endswith(".bias"):
                tensors[key] = torch.zeros(shape)
            elif len(shape) == 1:
                tensors[key] = torch.ones(shape)
            else:
                gen = torch.Generator().manual_seed(_seed_for(key, seed))
                tensors[key] = torch.empty(shape).normal_(0.0, std, generator=gen)
        weights._load_physical(b, b.from_hf(tensors))
