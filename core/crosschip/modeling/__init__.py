"""The model API: what every crosschip causal LM shares (:class:`CausalLM`, its output), the cache
protocol and generation, attention masks, rotary tables, and compiling a model.

``CausalLM`` and ``CausalLMOutput`` are importable from here (as before this package existed);
they load on first use, so importing a submodule stays light."""

from __future__ import annotations

_EXPORTS = {"CausalLM": "crosschip.modeling.causal_lm", "CausalLMOutput": "crosschip.modeling.causal_lm"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crosschip.modeling' has no attribute {name!r}")


__all__ = ["CausalLM", "CausalLMOutput"]
