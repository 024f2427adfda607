"""Component kinds: every building block a model asks its runtime for, each declared in one
place (:class:`ComponentKind`: its spec, canonical weights, reference implementation, call
contract, conformance cases and tensor-parallel split). The built-in kinds live in the modules of
this package; a plugin adds its own through the ``crosschip_register_component_kinds`` hook.

Declaring a kind imports no torch: its reference implementation is named lazily."""

from __future__ import annotations

from crosschip.components import attention, embedding, gated_mlp, layer_norm, linear, lm_head, qkv_projection
from crosschip.components import moe, rms_norm, rotary
from crosschip.components.kind import SPLITS, ComponentKind, Example

#: The built-in kinds, in the order listings show them.
BUILTIN: tuple[ComponentKind, ...] = (
    embedding.KIND,
    qkv_projection.KIND,
    linear.OUT_PROJECTION,
    gated_mlp.GATED_MLP,
    gated_mlp.MLP,
    moe.KIND,
    linear.LINEAR,
    rms_norm.KIND,
    layer_norm.KIND,
    rotary.KIND,
    attention.KIND,
    lm_head.LM_HEAD,
    lm_head.LOSS,
)

#: Names of the built-in kinds (``crosschip.specs.COMPONENTS`` is this tuple).
BUILTIN_NAMES: tuple[str, ...] = tuple(k.name for k in BUILTIN)


def get_kind(name: str, registry=None) -> ComponentKind:
    """The kind called ``name``, built-in or registered by a plugin; an error lists the valid
    names."""
    from crosschip.plugins.registry import get_registry

    return (registry or get_registry()).kind(name)


__all__ = ["BUILTIN", "BUILTIN_NAMES", "SPLITS", "ComponentKind", "Example", "get_kind"]
