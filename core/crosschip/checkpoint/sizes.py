"""Sanity checks on model sizes, run before anything is allocated: a config with absurd or
inconsistent sizes (or a norm epsilon that turns every logit into NaN) is rejected with the
numbers that make it so."""

from __future__ import annotations

import math
import os

import torch

from crosschip.errors import ConfigurationError

# Far beyond any released model, small enough that building the module tree on the meta device
# (which precedes the memory check) stays instantaneous.
LIMITS = {
    "num_hidden_layers": 4096,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 24,
}


def check_config_sizes(config, where: str = "config.json") -> None:
    for name, limit in LIMITS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigurationError(f"{where}: {name} must be a positive integer, found {value!r}")
        if value > limit:
            raise ConfigurationError(f"{where}: {name}={value} is beyond any plausible model (limit {limit})")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise ConfigurationError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
                                 f"{kv_heads} (each key/value head serves an equal group of query heads)")
    eps = getattr(config, "rms_norm_eps", None)
    # RMSNorm divides by sqrt(mean(x**2) + eps): a non-positive eps gives NaN wherever x is small.
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not math.isfinite(eps) or eps <= 0):
        raise ConfigurationError(f"{where}: rms_norm_eps must be a positive finite number, found {eps!r}")


def device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(model, device: torch.device, where: str = "config.json") -> None:
    """``model`` lives on the meta device, its parallel plan applied: compare the weight bytes
    this process will hold (its shards, for a sharded parameter) with the device's memory."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    numel = sum(p.numel() for p in local)
    needed = sum(p.numel() * p.element_size() for p in local)
    available = device_memory_bytes(device)
    if available is not None and needed > available:
        raise ConfigurationError(
            f"{where}: this process's weights alone need {needed / 2**30:,.1f} GiB ({numel:,} parameters), "
            f"more than the {available / 2**30:,.1f} GiB of memory of {device}; refusing to allocate")
