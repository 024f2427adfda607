"""Exceptions and warnings raised by crosschip.

Every error names what it was looking at (file, key, option, backend), what was expected and what
was found, so a user can act on the message alone.
"""

from __future__ import annotations


class CrosschipError(Exception):
    """Base class of every error crosschip raises on purpose."""


class ConfigurationError(CrosschipError, ValueError):
    """An option, argument or environment variable has a value crosschip cannot use."""


class UnknownNameError(ConfigurationError):
    """A backend or component name that does not exist; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid, where: str | None = None):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        origin = f" (from {where})" if where else ""
        super().__init__(
            f"unknown {kind} {name!r}{origin}; valid {kind}s: {', '.join(self.valid) or '(none)'}"
        )


class PluginError(CrosschipError):
    """A plugin failed to load or is incompatible, and strict mode turns that into an error."""


class StrictFallbackError(CrosschipError):
    """Strict mode forbids an accelerated request from ending on the reference backend."""


class ComponentBuildError(CrosschipError):
    """No backend in the chain could build a component."""


class CheckpointError(CrosschipError):
    """A checkpoint on disk does not match what the model expects."""


class CrosschipWarning(UserWarning):
    """Warnings crosschip emits (fallbacks to reference, ignored options)."""
