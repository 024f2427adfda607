"""``lm_head`` and ``loss``: the projection to the vocabulary and the next-token loss."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import BATCH, SEQ, call_on_x, hidden_example, randn
from crosschip.components.fields import check_softcap, quiet
from crosschip.components.kind import VOCAB_HEAD, VOCAB_LOSS, ComponentKind, Example


@dataclass(frozen=True)
class LMHeadSpec:
    """Output projection to the vocabulary; ``tied`` reuses the embedding weight.
    Logits are divided by ``logits_divisor`` (Granite's ``logits_scaling``), then soft-capped to
    ``softcap * tanh(logits / softcap)`` where ``softcap`` is set (Gemma 2's final logits)."""

    hidden_size: int
    vocab_size: int
    bias: bool = False
    tied: bool = False
    logits_divisor: float = 1.0
    softcap: float | None = quiet(None, extension=True)

    def __post_init__(self):
        check_softcap("LMHeadSpec", self.softcap)


@dataclass(frozen=True)
class LossSpec:
    """Next-token cross-entropy, shifted inside the loss as transformers does."""

    vocab_size: int
    ignore_index: int = -100


def _head_weights(spec: LMHeadSpec) -> dict[str, tuple[int, ...]]:
    shapes = {}
    if not spec.tied:
        shapes["weight"] = (spec.vocab_size, spec.hidden_size)
    if spec.bias:
        shapes["bias"] = (spec.vocab_size,)
    return shapes


#: Hidden size of the LM head a loss case runs on.
_LOSS_HIDDEN = 32


def _loss_example(spec: LossSpec, options, gen) -> Example:
    import torch

    labels = torch.randint(0, spec.vocab_size, (BATCH, SEQ), generator=gen)
    labels[0, :2] = spec.ignore_index
    return Example({"x": randn(gen, BATCH, SEQ, _LOSS_HIDDEN), "labels": labels,
                    "precomputed_logits": bool(options.get("precomputed_logits"))})


def _loss_call(module, inputs, helpers) -> tuple:
    lm_head = helpers["lm_head"]
    logits = lm_head(inputs["x"]) if inputs["precomputed_logits"] else None
    return (module(inputs["x"], inputs["labels"], lm_head, logits),)


LM_HEAD = ComponentKind(
    name="lm_head",
    spec=LMHeadSpec,
    weights=_head_weights,
    reference="crosschip.reference.components:LMHead",
    call=call_on_x,
    example=hidden_example("hidden_size"),
    cases=lambda: [
        ("plain", LMHeadSpec(32, 64), {}),
        ("bias-divisor", LMHeadSpec(32, 64, bias=True, logits_divisor=2.0), {}),
        ("softcap", LMHeadSpec(32, 64, softcap=3.0), {}),
    ],
    tensor_parallel=lambda spec: VOCAB_HEAD,
    summary="projection to the vocabulary (tied or not, bias, divisor, soft-capping)",
)

LOSS = ComponentKind(
    name="loss",
    spec=LossSpec,
    weights=lambda spec: {},
    reference="crosschip.reference.components:CausalLMLoss",
    call=_loss_call,
    example=_loss_example,
    cases=lambda: [
        ("from-lm-head", LossSpec(64), {}),
        ("given-logits", LossSpec(64, ignore_index=-1), {"precomputed_logits": True}),
    ],
    tensor_parallel=lambda spec: VOCAB_LOSS,
    helpers=lambda spec: {"lm_head": ("lm_head", LMHeadSpec(_LOSS_HIDDEN, spec.vocab_size))},
    summary="next-token cross-entropy (a backend may fuse it with the LM head)",
)
