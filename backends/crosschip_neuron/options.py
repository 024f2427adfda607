"""Options of the neuron backend that are not runtime settings: read from the environment."""

from __future__ import annotations

import os

from crosschip.errors import ConfigurationError

#: ``1`` (default): NxD's fused ``weight_qkv``; ``0``: separate ``weight_q`` / ``weight_k`` / ``weight_v``.
FUSE_QKV = "CROSSCHIP_NEURON_FUSE_QKV"


def fused_qkv() -> bool:
    raw = os.environ.get(FUSE_QKV, "1").strip()
    if raw not in ("0", "1"):
        raise ConfigurationError(f"{FUSE_QKV}={raw!r}: expected 1 (fused weight_qkv) or 0 (separate q/k/v)")
    return raw == "1"
