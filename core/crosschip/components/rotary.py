"""``rotary``: rotary position embedding (every Hugging Face rope type)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crosschip.components.examples import BATCH, SEQ, randn
from crosschip.components.kind import LOCAL, ComponentKind, Example


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding. ``parameters`` is the Hugging Face ``rope_parameters`` dict as sorted
    items (rope_type, rope_theta, factor, ...); ``config`` is the Hugging Face config the
    transformers rope initialisers read, kept out of equality and hashing."""

    head_dim: int
    max_position_embeddings: int
    parameters: tuple[tuple[str, Any], ...]
    config: Any = field(default=None, compare=False, hash=False, repr=False)

    @property
    def rope_type(self) -> str:
        return dict(self.parameters).get("rope_type", "default")


def _example(spec: RopeSpec, options, gen) -> Example:
    import torch

    positions = torch.arange(SEQ).unsqueeze(0)  # one row for the batch, as decoders build it
    if not options.get("shared_positions"):
        positions = positions + torch.tensor([[0], [40]])  # each sequence its own offset
    return Example({"position_ids": positions, "q": randn(gen, BATCH, SEQ, 3, spec.head_dim),
                    "k": randn(gen, BATCH, SEQ, 1, spec.head_dim)})


def _call(module, inputs, helpers) -> tuple:
    # The tables are the backend's own (cos/sin, angles...) and only pass from forward to
    # apply, so the contract is the rotated q and k.
    return tuple(module.apply(inputs["q"], inputs["k"], module(inputs["position_ids"], inputs["q"].dtype)))


def _default(head_dim: int, theta: float, **extra) -> RopeSpec:
    return RopeSpec(head_dim, 64, tuple(sorted({"rope_theta": theta, "rope_type": "default", **extra}.items())))


def _llama3() -> RopeSpec:
    from transformers import LlamaConfig

    from crosschip.models.hf_config import rope_spec

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16})
    return rope_spec(config, 16)


KIND = ComponentKind(
    name="rotary",
    spec=RopeSpec,
    weights=lambda spec: {},
    reference="crosschip.reference.components:Rotary",
    call=_call,
    example=_example,
    cases=lambda: [
        ("default", _default(8, 10000.0), {}),
        ("shared-positions", _default(8, 10000.0), {"shared_positions": True}),
        ("llama3", _llama3(), {"shared_positions": True}),
        # Only the first half of each head rotates (Phi-3 mini, GPT-NeoX style configs).
        ("partial", _default(16, 10000.0, partial_rotary_factor=0.5), {"shared_positions": True}),
    ],
    tensor_parallel=lambda spec: LOCAL,
    summary="rotary position embedding: tables from positions, applied to q and k",
)
