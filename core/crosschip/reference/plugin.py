"""Hook implementations of the built-in ``reference`` backend."""

from __future__ import annotations

from crosschip.layouts import IDENTITY, Rename
from crosschip.plugins import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl

NAME = "reference"
_COMPONENTS = "crosschip.reference.components"

_FACTORIES = {
    "embedding": "Embedding",
    "rms_norm": "RMSNorm",
    "layer_norm": "LayerNorm",
    "linear": "Linear",
    "mlp": "MLP",
    "qkv_projection": "QKVProjection",
    "out_projection": "Linear",
    "gated_mlp": "GatedMLP",
    "rotary": "Rotary",
    "attention": "EagerAttention",
    "lm_head": "LMHead",
    "loss": "CausalLMLoss",
}


def _always() -> Probe:
    return Probe(True, "plain torch")


def _factory(class_name: str):
    def build(spec, ctx):
        from crosschip.reference import components

        return getattr(components, class_name)(spec)

    build.__qualname__ = f"reference.{class_name}"
    return build


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
    return [ComponentImpl(NAME, component, _factory(cls), handles=("*",)) for component, cls in _FACTORIES.items()]


def _qkv_layout(spec, ctx):
    return Rename.of(**{f"{r}.{p}": f"{r}_proj.{p}" for r in "qkv" for p in ("weight", "bias")})


def _mlp_layout(spec, ctx):
    return Rename.of(**{f"{r}.{p}": f"{r}_proj.{p}" for r in ("gate", "up", "down")
                        for p in ("weight", "bias")})


def _plain_mlp_layout(spec, ctx):
    return Rename.of(**{f"{r}.{p}": f"{r}_proj.{p}" for r in ("up", "down") for p in ("weight", "bias")})


@hookimpl
def crosschip_register_layouts():
    identity = lambda spec, ctx: IDENTITY  # noqa: E731 - parameters already carry role names
    return [
        LayoutImpl(NAME, "qkv_projection", _qkv_layout),
        LayoutImpl(NAME, "gated_mlp", _mlp_layout),
        LayoutImpl(NAME, "mlp", _plain_mlp_layout),
        *(LayoutImpl(NAME, c, identity) for c in ("embedding", "rms_norm", "layer_norm", "out_projection",
                                                  "linear", "lm_head")),
    ]


@hookimpl
def crosschip_environment_info():
    import torch

    return {"torch": torch.__version__}
