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


def canonical_tensor(key: str, shape, seed: int = 0, std: float = 0.02, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """The initial value of Hugging Face weight ``key``: a function of (seed, key) only, so any
    implementation (another backend, transformers itself) can be given identical weights. The
    stream is per device type: CPU and CUDA generators differ."""
    if key.endswith(".bias"):
        return torch.zeros(shape, device=device, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, device=device, dtype=dtype)
    gen = torch.Generator(device=device or "cpu").manual_seed(_seed_for(key, seed))
    return torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


@torch.no_grad()
def init_weights(model, seed: int = 0, std: float = 0.02, device=None) -> None:
    """Normal(0, std) for matrices and embeddings, ones for norm weights, zeros for biases
    (transformers' convention for these models), drawn on ``device`` (default CPU)."""
    for b in weights.bindings(model):
        tensors = {key: canonical_tensor(key, shape, seed, std, device) for key, shape in b.hf_shapes.items()}
        weights._load_physical(b, b.from_hf(tensors))
