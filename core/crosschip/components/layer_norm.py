"""``layer_norm``: LayerNorm with optional bias (GPT-NeoX, GPT-2, Phi, StarCoder2)."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import BATCH, SEQ, call_on_x, hidden_example
from crosschip.components.fields import check_scope, positive, quiet, split_of_scope
from crosschip.components.kind import ComponentKind


@dataclass(frozen=True)
class LayerNormSpec:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight (+ bias)``."""

    hidden_size: int
    eps: float = 1e-5
    bias: bool = True
    scope: str = quiet("hidden")

    def __post_init__(self):
        positive("LayerNormSpec.hidden_size", self.hidden_size)
        check_scope("LayerNormSpec", self.scope)
        if self.scope == "projection":
            raise ValueError("LayerNormSpec.scope='projection' is not supported (no model needs it); "
                             "use 'hidden' or 'head'")


def _weights(spec: LayerNormSpec) -> dict[str, tuple[int, ...]]:
    shapes = {"weight": (spec.hidden_size,)}
    if spec.bias:
        shapes["bias"] = (spec.hidden_size,)
    return shapes


KIND = ComponentKind(
    name="layer_norm",
    spec=LayerNormSpec,
    weights=_weights,
    reference="crosschip.reference.components:LayerNorm",
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=lambda: [
        ("bias", LayerNormSpec(32), {"input_scale": 2.0}),
        ("no-bias", LayerNormSpec(32, 1e-6, bias=False), {"input_scale": 2.0}),
        ("head-dim", LayerNormSpec(8, scope="head"), {"input_shape": (BATCH, SEQ, 3, 8), "input_scale": 2.0}),
    ],
    tensor_parallel=lambda spec: split_of_scope(spec.scope),
    summary="LayerNorm with optional bias",
)
