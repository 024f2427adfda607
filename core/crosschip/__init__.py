"""crosschip: one transformer model definition that trains and runs on any chip.

Importing this package loads no plugin and initialises no device; plugins are discovered on the
first use of a :class:`Runtime` or of ``crosschip backends``.
"""

from __future__ import annotations

from crosschip.errors import (
    CheckpointError,
    ConfigurationError,
    CrosschipError,
    CrosschipWarning,
    PluginError,
    StrictFallbackError,
    UnknownNameError,
)
from crosschip.plugins import (
    PLUGIN_API_VERSION,
    BackendDescriptor,
    ComponentImpl,
    LayoutImpl,
    Probe,
    hookimpl,
)
from crosschip.specs import (
    AttentionSpec,
    EmbeddingSpec,
    GatedMLPSpec,
    LayerNormSpec,
    LinearSpec,
    LMHeadSpec,
    LossSpec,
    MLPSpec,
    NormSpec,
    ParallelSpec,
    QKVSpec,
    RopeSpec,
)

from crosschip import _moved

__version__ = "0.1.0"

_moved.install()  # the flat layout's import paths (crosschip.layouts...) still resolve

_LAZY = {
    "Runtime": "crosschip.runtime",
    "from_pretrained": "crosschip.checkpoint.loading",
    "AttentionMask": "crosschip.modeling.masks",
    "CausalLM": "crosschip.modeling",
    "LoraConfig": "crosschip.lora.config",
}


def __getattr__(name: str):
    # Runtime and loading pull in torch.nn machinery; keep `import crosschip` light.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crosschip' has no attribute {name!r}")


__all__ = [
    "PLUGIN_API_VERSION", "AttentionMask", "AttentionSpec", "BackendDescriptor", "CausalLM",
    "CheckpointError", "ComponentImpl", "ConfigurationError", "CrosschipError", "CrosschipWarning",
    "EmbeddingSpec", "GatedMLPSpec", "LMHeadSpec", "LayerNormSpec", "LayoutImpl", "LinearSpec", "LoraConfig",
    "LossSpec", "MLPSpec", "NormSpec", "ParallelSpec", "PluginError", "Probe", "QKVSpec", "RopeSpec", "Runtime",
    "StrictFallbackError", "UnknownNameError", "from_pretrained", "hookimpl",
]
