"""``gated_mlp`` and ``mlp``: the feed-forward blocks, gated (SwiGLU, GeGLU) and not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crosschip.components.examples import call_on_x, hidden_example
from crosschip.components.fields import check_activation, positive
from crosschip.components.kind import FEED_FORWARD, ComponentKind

if TYPE_CHECKING:  # input norms are either kind's spec
    from crosschip.components.layer_norm import LayerNormSpec
    from crosschip.components.rms_norm import NormSpec


@dataclass(frozen=True)
class GatedMLPSpec:
    """``down(act(gate(x)) * up(x))``; ``input_norm`` lets a backend fuse the pre-MLP norm."""

    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    bias: bool = False
    input_norm: NormSpec | LayerNormSpec | None = None

    def __post_init__(self):
        positive("GatedMLPSpec.hidden_size", self.hidden_size)
        positive("GatedMLPSpec.intermediate_size", self.intermediate_size)
        check_activation("GatedMLPSpec", self.activation)


@dataclass(frozen=True)
class MLPSpec:
    """``down(act(up(x)))``, not gated (GPT-NeoX, GPT-2, StarCoder2, Phi); ``activation`` is a
    transformers ``ACT2FN`` name (``gelu``, ``gelu_new``, ``gelu_pytorch_tanh``, ``relu``,
    ``silu``...); ``input_norm`` lets a backend fuse the pre-MLP norm."""

    hidden_size: int
    intermediate_size: int
    activation: str = "gelu"
    bias: bool = True
    input_norm: NormSpec | LayerNormSpec | None = None

    def __post_init__(self):
        positive("MLPSpec.hidden_size", self.hidden_size)
        positive("MLPSpec.intermediate_size", self.intermediate_size)
        check_activation("MLPSpec", self.activation)


def _weights(roles):
    def weights(spec) -> dict[str, tuple[int, ...]]:
        h, i = spec.hidden_size, spec.intermediate_size
        shapes = {}
        for role in roles:
            shape = (h, i) if role == "down" else (i, h)
            shapes[f"{role}.weight"] = shape
            if spec.bias:
                shapes[f"{role}.bias"] = shape[:1]
        return shapes

    return weights


def _layout(roles):
    def layout(spec, ctx):
        from crosschip.weights.layouts import Rename

        return Rename.of(**{f"{r}.{p}": f"{r}_proj.{p}" for r in roles for p in ("weight", "bias")})

    return layout


def _gated_cases():
    from crosschip.components.rms_norm import NormSpec

    return [
        ("silu", GatedMLPSpec(32, 64), {}),
        ("gelu-bias", GatedMLPSpec(32, 48, activation="gelu_pytorch_tanh", bias=True), {}),
        ("input-norm", GatedMLPSpec(32, 64, input_norm=NormSpec(32, 1e-5)), {}),
    ]


def _plain_cases():
    from crosschip.components.layer_norm import LayerNormSpec

    return [
        ("gelu-bias", MLPSpec(32, 64), {}),
        ("relu", MLPSpec(32, 48, activation="relu", bias=False), {}),
        ("layer-norm-input", MLPSpec(32, 64, activation="gelu_pytorch_tanh", input_norm=LayerNormSpec(32)), {}),
    ]


GATED_MLP = ComponentKind(
    name="gated_mlp",
    spec=GatedMLPSpec,
    weights=_weights(("gate", "up", "down")),
    reference="crosschip.reference.components:GatedMLP",
    reference_layout=_layout(("gate", "up", "down")),
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=_gated_cases,
    tensor_parallel=lambda spec: FEED_FORWARD,
    summary="gated feed-forward block: down(act(gate(x)) * up(x))",
)

MLP = ComponentKind(
    name="mlp",
    spec=MLPSpec,
    weights=_weights(("up", "down")),
    reference="crosschip.reference.components:MLP",
    reference_layout=_layout(("up", "down")),
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=_plain_cases,
    tensor_parallel=lambda spec: FEED_FORWARD,
    summary="feed-forward block, not gated: down(act(up(x)))",
)
