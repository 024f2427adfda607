"""``rms_norm``: RMSNorm, on the residual stream, per head, or over a whole projection."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import BATCH, SEQ, call_on_x, hidden_example
from crosschip.components.fields import check_scope, positive, quiet, split_of_scope
from crosschip.components.kind import ComponentKind


@dataclass(frozen=True)
class NormSpec:
    """RMSNorm over the last dimension: ``(offset + weight) * x / sqrt(mean(x^2) + eps)``.

    ``scope`` says what the last dimension is (``hidden``, ``head`` or ``projection``, see
    :data:`crosschip.specs.NormScope`); ``offset`` is 1.0 for Gemma's norms, whose stored weight is
    the difference from one (they then scale in float32, as Gemma's own RMSNorm does)."""

    hidden_size: int
    eps: float = 1e-6
    scope: str = quiet("hidden")
    offset: float = quiet(0.0, extension=True)

    def __post_init__(self):
        positive("NormSpec.hidden_size", self.hidden_size)
        check_scope("NormSpec", self.scope)


KIND = ComponentKind(
    name="rms_norm",
    spec=NormSpec,
    weights=lambda spec: {"weight": (spec.hidden_size,)},
    reference="crosschip.reference.components:RMSNorm",
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=lambda: [
        ("hidden", NormSpec(32, 1e-6), {"input_scale": 2.0}),
        # qk_norm: a norm over head_dim applied to [batch, seq, heads, head_dim].
        ("head-dim", NormSpec(8, 1e-5, scope="head"), {"input_shape": (BATCH, SEQ, 3, 8), "input_scale": 2.0}),
        ("offset", NormSpec(32, 1e-6, offset=1.0), {"input_scale": 2.0}),  # Gemma's 1 + weight
        ("projection", NormSpec(32, 1e-6, scope="projection"), {"input_scale": 2.0}),
    ],
    tensor_parallel=lambda spec: split_of_scope(spec.scope),
    summary="RMSNorm (scope hidden / head / projection, optional 1 + weight offset)",
)
