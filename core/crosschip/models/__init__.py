"""The model zoo: each model is written only against the core runtime and components, and is
registered under the Hugging Face ``architectures`` names it loads."""

from __future__ import annotations

from crosschip.errors import ConfigurationError

_REGISTRY: dict[str, type] = {}


def register_model(cls):
    """Class decorator: load ``cls`` for each Hugging Face architecture name it lists."""
    for name in cls.architectures:
        _REGISTRY[name] = cls
    return cls


def model_class(architecture: str, where: str = "config.json"):
    """The model class for a Hugging Face ``architectures`` name; an error lists the supported."""
    _load_builtin()
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ConfigurationError(
            f"{where}: unsupported architecture {architecture!r}; supported: "
            f"{', '.join(sorted(_REGISTRY))}"
        ) from None


def supported_architectures() -> list[str]:
    """Every Hugging Face architecture name the zoo loads."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Each module registers its classes on import.
    from crosschip.models import (gemma2, gemma3, gpt_neox, granite, llama, mistral, mixtral, olmo2,  # noqa: F401
                                  olmoe, phi3, qwen2, qwen3, qwen3_moe, smollm3)
