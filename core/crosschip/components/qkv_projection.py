"""``qkv_projection``: the query, key and value projections, returning heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crosschip.components.examples import call_on_x, hidden_example
from crosschip.components.fields import positive
from crosschip.components.kind import COLUMN_HEADS, ComponentKind

if TYPE_CHECKING:  # input norms are either kind's spec
    from crosschip.components.layer_norm import LayerNormSpec
    from crosschip.components.rms_norm import NormSpec


@dataclass(frozen=True)
class QKVSpec:
    """Query/key/value projection returning ``[batch, seq, heads, head_dim]`` q, k and v.
    ``input_norm`` (a ``NormSpec`` or ``LayerNormSpec``) lets a backend fuse the pre-attention
    norm."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool = False
    input_norm: NormSpec | LayerNormSpec | None = None
    parallel: str = "column"

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            positive(f"QKVSpec.{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"QKVSpec.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


def _weights(spec: QKVSpec) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for role, rows in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size)):
        shapes[f"{role}.weight"] = (rows, spec.hidden_size)
        if spec.bias:
            shapes[f"{role}.bias"] = (rows,)
    return shapes


def _cases():
    from crosschip.components.rms_norm import NormSpec

    return [
        ("gqa", QKVSpec(32, 4, 2, 8), {}),
        ("mha-bias", QKVSpec(32, 4, 4, 8, bias=True), {}),
        ("mqa", QKVSpec(48, 6, 1, 16), {}),
        ("input-norm", QKVSpec(32, 4, 2, 8, input_norm=NormSpec(32, 1e-5)), {}),
    ]


def _layout(spec, ctx):
    from crosschip.weights.layouts import Rename

    return Rename.of(**{f"{r}.{p}": f"{r}_proj.{p}" for r in "qkv" for p in ("weight", "bias")})


KIND = ComponentKind(
    name="qkv_projection",
    spec=QKVSpec,
    weights=_weights,
    reference="crosschip.reference.components:QKVProjection",
    reference_layout=_layout,
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=_cases,
    tensor_parallel=lambda spec: COLUMN_HEADS,
    summary="query, key and value projections into heads (GQA, optional bias and fused input norm)",
)
