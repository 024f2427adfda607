"""``linear`` and ``out_projection``: a projection whose tensor-parallel style the spec states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from crosschip.components.examples import call_on_x, hidden_example
from crosschip.components.fields import positive
from crosschip.components.kind import COLUMN, REPLICATED, ROW, ComponentKind


@dataclass(frozen=True)
class LinearSpec:
    """A projection ``in_features -> out_features``; ``parallel`` says how tensor parallelism
    splits it: ``"column"`` (output features sharded; the next projection must be a ``"row"``
    one), ``"row"`` (input features sharded, outputs summed) or ``"replicated"`` (whole on every
    rank); every backend's plan honours it or refuses the model. ``input_heads``: ``(num_heads,
    num_kv_heads)`` when the input is attention heads (``o_proj``), so a backend that reorders
    query heads across ranks (KV-head replication) can reorder these input columns to match."""

    in_features: int
    out_features: int
    bias: bool = False
    parallel: str = "replicated"
    input_heads: tuple[int, int] | None = None

    def __post_init__(self):
        positive("LinearSpec.in_features", self.in_features)
        positive("LinearSpec.out_features", self.out_features)
        if self.parallel not in ("column", "row", "replicated"):
            raise ValueError(f"LinearSpec.parallel must be column, row or replicated, found {self.parallel!r}")
        if self.input_heads is not None:
            heads, kv_heads = self.input_heads
            if heads <= 0 or kv_heads <= 0 or heads % kv_heads or self.in_features % heads:
                raise ValueError(f"LinearSpec.input_heads {self.input_heads} must be (heads, kv_heads) with "
                                 f"kv_heads dividing heads and heads dividing in_features ({self.in_features})")


def _weights(spec: LinearSpec) -> dict[str, tuple[int, ...]]:
    shapes = {"weight": (spec.out_features, spec.in_features)}
    if spec.bias:
        shapes["bias"] = (spec.out_features,)
    return shapes


_SPLITS = {"column": COLUMN, "row": ROW, "replicated": REPLICATED}

LINEAR = ComponentKind(
    name="linear",
    spec=LinearSpec,
    weights=_weights,
    reference="crosschip.reference.components:Linear",
    call=call_on_x,
    example=hidden_example("in_features"),
    cases=lambda: [
        ("column-bias", LinearSpec(32, 48, parallel="column", bias=True), {}),
        ("row", LinearSpec(48, 32, parallel="row"), {}),
        ("replicated", LinearSpec(32, 16), {}),
    ],
    tensor_parallel=lambda spec: _SPLITS[spec.parallel],
    summary="a general projection, split as its spec's parallel style says",
)

#: The attention output projection: a ``linear`` the models mark with ``input_heads``, kept as
#: its own kind so a backend can build it differently (row-parallel with permuted heads).
OUT_PROJECTION = dataclasses.replace(
    LINEAR,
    name="out_projection",
    cases=lambda: [
        ("plain", LinearSpec(32, 48), {}),
        ("row-bias", LinearSpec(48, 32, bias=True, parallel="row"), {}),
    ],
    summary="the attention output projection",
)
