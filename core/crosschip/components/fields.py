"""Checks and field helpers the spec dataclasses share."""

from __future__ import annotations

from dataclasses import field

#: What a norm normalises: the residual stream (``hidden``), each attention head on its own
#: (``head``: Qwen3's q/k norms), or a whole projection's output across its heads
#: (``projection``: OLMo-2's q/k norms). Tensor parallelism splits each differently.
NORM_SCOPES = ("hidden", "head", "projection")


def positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, found {value!r}")


def quiet(default, extension: bool = False):
    """A field left out of :func:`crosschip.specs.describe` while it holds its default (fields
    added after the report format was fixed, so existing reports and logs read as before). An
    ``extension`` changes a component's math when set: see :func:`crosschip.specs.extensions_used`."""
    return field(default=default, metadata={"omit_default": True, "extension": extension})


def check_scope(name: str, scope) -> None:
    if scope not in NORM_SCOPES:
        raise ValueError(f"{name}.scope must be one of {', '.join(NORM_SCOPES)}, found {scope!r}")


def check_activation(name: str, activation: str) -> None:
    from transformers.activations import ACT2CLS

    if activation not in ACT2CLS:
        raise ValueError(f"{name}.activation {activation!r} is not a transformers activation; "
                         f"expected one of {', '.join(sorted(ACT2CLS))}")


def check_softcap(name: str, softcap) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}.softcap must be positive or None, found {softcap!r}")


def split_of_scope(scope: str) -> str:
    """The tensor-parallel split of a norm of ``scope``."""
    from crosschip.components.kind import HEADS, SHARDED_FEATURES, STREAM

    return {"hidden": STREAM, "head": HEADS, "projection": SHARDED_FEATURES}[scope]
