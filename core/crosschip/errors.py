"""Exceptions and warnings raised by crosschip.

Every error names what it was looking at (file, key, option, backend), what was expected and what
was found, so a user can act on the message alone.
"""

from __future__ import annotations

import errno
import os
import re

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


class TrainingDivergedError(CrosschipError):
    """A training loss (or gradient norm) became NaN or infinite; nothing was saved."""

    def __init__(self, message: str, step: int, loss: float, grad_norm: float):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(message)


def save_failure(directory, exc: BaseException) -> CheckpointError | None:
    """The error for an I/O failure met while writing a checkpoint into ``directory`` (whose
    previous content the writer leaves in place), or None for anything else. A full disk is the
    common case and its raw message names neither the checkpoint nor the remedy; safetensors
    reports it as its own exception, "... I/O error: No space left on device (os error 28)"."""
    if isinstance(exc, OSError):
        code = exc.errno
    elif type(exc).__name__ == "SafetensorError" and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(found.group(1))
    else:
        return None
    if code == errno.ENOSPC:
        return CheckpointError(f"cannot write a checkpoint to {directory}: the disk is full (errno ENOSPC: "
                               f"{os.strerror(code)}); free some space and save again; the previous checkpoint "
                               "there is unchanged")
    return CheckpointError(f"cannot write a checkpoint to {directory}: {exc}; any previous checkpoint there is "
                           "unchanged")


class CrosschipWarning(UserWarning):
    """Warnings crosschip emits (fallbacks to reference, ignored options)."""
