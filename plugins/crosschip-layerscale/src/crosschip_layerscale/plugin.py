"""Hook implementations of the ``layerscale`` plugin: one new component kind and one backend that
implements it (every other component falls back along the chain)."""

from __future__ import annotations

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl

NAME = "layerscale"


def probe() -> Probe:
    return Probe(True, "plain torch")


def _layout(spec, ctx):
    from crosschip.weights.layouts import Rename

    return Rename.of(weight="gamma")


@hookimpl
def crosschip_register_component_kinds():
    from crosschip_layerscale.kind import KIND

    return [KIND]


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(name=NAME, priority=40, device_types=("cpu", "cuda"), probe=probe,
                              description="layer_scale in float32")]


@hookimpl
def crosschip_register_components():
    return [ComponentImpl(NAME, "layer_scale", "crosschip_layerscale.modules:Float32LayerScale")]


@hookimpl
def crosschip_register_layouts():
    return [LayoutImpl(NAME, "layer_scale", _layout)]
