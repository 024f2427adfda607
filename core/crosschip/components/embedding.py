"""``embedding``: token embedding."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import BATCH, SEQ
from crosschip.components.fields import positive
from crosschip.components.kind import VOCAB_EMBEDDING, ComponentKind, Example


@dataclass(frozen=True)
class EmbeddingSpec:
    """Token embedding ``[vocab_size, hidden_size]``; ``padding_idx`` gets no gradient."""

    vocab_size: int
    hidden_size: int
    padding_idx: int | None = None

    def __post_init__(self):
        positive("EmbeddingSpec.vocab_size", self.vocab_size)
        positive("EmbeddingSpec.hidden_size", self.hidden_size)


def _example(spec: EmbeddingSpec, options, gen) -> Example:
    import torch

    ids = torch.randint(0, spec.vocab_size, (BATCH, SEQ), generator=gen)
    if spec.padding_idx is not None:
        ids[:, 0] = spec.padding_idx
    return Example({"ids": ids})


KIND = ComponentKind(
    name="embedding",
    spec=EmbeddingSpec,
    weights=lambda spec: {"weight": (spec.vocab_size, spec.hidden_size)},
    reference="crosschip.reference.components:Embedding",
    call=lambda module, inputs, helpers: (module(inputs["ids"]),),
    example=_example,
    cases=lambda: [
        ("plain", EmbeddingSpec(64, 32), {}),
        ("padding-idx", EmbeddingSpec(64, 32, padding_idx=0), {}),
    ],
    tensor_parallel=lambda spec: VOCAB_EMBEDDING,
    summary="token embedding",
)
