"""The ``layer_scale`` component kind, declared in one place: spec, weights, reference
implementation, call contract, conformance cases and tensor-parallel split. Imports no torch
(crosschip imports this whenever it lists backends); the modules are named lazily."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import call_on_x, hidden_example
from crosschip.components.kind import STREAM, ComponentKind


@dataclass(frozen=True)
class LayerScaleSpec:
    """``weight * x`` over the last dimension; ``init`` is the weight's initial value."""

    hidden_size: int
    init: float = 1e-5

    def __post_init__(self):
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ValueError(f"LayerScaleSpec.hidden_size must be a positive integer, found {self.hidden_size!r}")


KIND = ComponentKind(
    name="layer_scale",
    spec=LayerScaleSpec,
    weights=lambda spec: {"weight": (spec.hidden_size,)},
    reference="crosschip_layerscale.modules:ReferenceLayerScale",
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=lambda: [
        ("hidden", LayerScaleSpec(32), {}),
        ("heads", LayerScaleSpec(8, init=0.1), {"input_shape": (2, 5, 3, 8)}),
    ],
    # Replicated weights on the residual stream: whole on every rank, on this rank's part of the
    # sequence under sequence parallelism (a plan sums the weight's gradient there).
    tensor_parallel=lambda spec: STREAM,
    summary="LayerScale: learned per-channel scale of a residual branch",
)
