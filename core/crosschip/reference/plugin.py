"""Hook implementations of the built-in ``reference`` backend."""

from __future__ import annotations

from crosschip.components import BUILTIN
from crosschip.weights.layouts import IDENTITY
from crosschip.plugins import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl
from crosschip.plugins.descriptors import resolve_callable

NAME = "reference"


def _always() -> Probe:
    return Probe(True, "plain torch")


def _factory(reference):
    """A factory building the kind's reference implementation, which takes the spec alone:
    plain torch needs nothing else from the runtime (core builds it on the meta device and
    materialises it where the runtime says)."""

    def build(spec, ctx):
        return resolve_callable(reference)(spec)

    build.__qualname__ = f"reference.{getattr(reference, '__qualname__', reference)}"
    return build


def reference_impls(kind) -> tuple[ComponentImpl, LayoutImpl]:
    """The reference backend's implementation and layout of ``kind``: the kind's own reference
    module, which handles every extension of its spec (it defines them)."""
    impl = ComponentImpl(NAME, kind.name, _factory(kind.reference), handles=("*",))
    layout = kind.reference_layout or (lambda spec, ctx: IDENTITY)
    return impl, LayoutImpl(NAME, kind.name, layout)


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=0,
        # Plain torch runs wherever torch does.
        device_types=("cpu", "cuda", "mps", "xpu", "xla", "hpu", "meta"),
        probe=_always,
        description="plain torch, the same math as transformers; fallback and test oracle",
    )]


@hookimpl
def crosschip_register_components():
    return [reference_impls(kind)[0] for kind in BUILTIN]


@hookimpl
def crosschip_register_layouts():
    return [reference_impls(kind)[1] for kind in BUILTIN]


@hookimpl
def crosschip_environment_info():
    import torch

    return {"torch": torch.__version__}
