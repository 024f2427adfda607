"""What a component kind is: everything core and every backend need to know about one building
block, declared together (see :class:`ComponentKind`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

#: How tensor parallelism splits a component, in backend-neutral terms (:attr:`ComponentKind.
#: tensor_parallel`). Each backend's parallel plan maps these to its own mechanism, or refuses a
#: model holding one it cannot honour; none guesses from the module tree.
LOCAL = "local"  # no weights to split: runs on whatever local tensors it is given (attention, rotary)
STREAM = "stream"  # replicated weights on the residual stream (a hidden-size norm); sequence-sharded under SP
HEADS = "heads"  # replicated weights applied to each head of this rank's heads: gradients summed over TP
SHARDED_FEATURES = "sharded_features"  # on a column-sharded projection's features: weights sharded to
#                                        match, statistics reduced over TP (OLMo-2's q/k norms)
COLUMN = "column"  # output features sharded; the output stays sharded for a ROW component to take
ROW = "row"  # input features sharded; the output summed back onto the stream
REPLICATED = "replicated"  # whole on every rank
COLUMN_HEADS = "column_heads"  # a projection into heads: whole KV groups per rank
FEED_FORWARD = "feed_forward"  # column into the hidden features, row out of them
VOCAB_EMBEDDING = "vocab_embedding"  # vocabulary rows sharded, partial lookups summed
VOCAB_HEAD = "vocab_head"  # vocabulary rows sharded, logits sharded on the vocabulary
VOCAB_LOSS = "vocab_loss"  # runs on vocab-sharded logits
SPLITS = (LOCAL, STREAM, HEADS, SHARDED_FEATURES, COLUMN, ROW, REPLICATED, COLUMN_HEADS, FEED_FORWARD,
          VOCAB_EMBEDDING, VOCAB_HEAD, VOCAB_LOSS)

Factory = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class Example:
    """Inputs of one conformance case: ``inputs`` by name (float tensors become leaves that
    collect gradients), and where some outputs are to be ignored (queries of padding tokens) a
    ``[batch, seq]`` boolean mask of the rows that count."""

    inputs: dict[str, Any]
    keep: Any = None


@dataclass(frozen=True)
class ComponentKind:
    """One kind of building block (``attention``, ``layer_norm``...), declared in one place.

    Attributes:
        name: the component name models ask for (``runtime.component(name, spec)``), backends
            implement (``ComponentImpl``) and environment variables name
            (``CROSSCHIP_BACKEND_<NAME>``).
        spec: the frozen dataclass describing one instance (sizes, options).
        weights: ``spec -> {role: shape}``, the canonical (Hugging Face) tensors of one instance,
            global and unsharded. A fused input norm's roles (``norm.weight``...) are added by core.
        reference: ``spec -> nn.Module`` (a module class, say), the reference backend's
            implementation in plain torch: the test oracle every other backend is compared with
            (a lazy ``"module:attr"`` string keeps this declaration free of torch imports).
        call: ``(module, inputs, helpers) -> tuple of tensors``, the call contract: how a model
            calls the module on :attr:`Example.inputs` (``helpers`` holds the modules of
            :attr:`helpers`, built by the reference backend).
        example: ``(spec, options, generator) -> Example``, float32 inputs for a case.
        cases: ``() -> [(label, spec, options)]``, tiny specs covering what models ask of this
            kind; the conformance kit checks every backend that implements it against them.
        tensor_parallel: ``spec -> split`` (one of :data:`SPLITS`), how tensor parallelism splits
            an instance.
        reference_layout: ``(spec, ctx) -> Transform`` from canonical roles to the reference
            module's parameter names (None: they are the role names).
        helpers: ``spec -> {name: (kind, spec)}``, other components the call contract needs
            (the loss needs an LM head).
        summary: one line for listings and docs.
    """

    name: str
    spec: type
    weights: Callable[[Any], dict[str, tuple[int, ...]]]
    reference: Factory
    call: Callable[..., tuple]
    example: Callable[..., Example]
    cases: Callable[[], list[tuple[str, Any, dict]]]
    tensor_parallel: Callable[[Any], str]
    reference_layout: Factory | None = None
    helpers: Callable[[Any], dict[str, tuple[str, Any]]] = field(default=lambda spec: {})
    summary: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"component kind name {self.name!r} must be a lower-case identifier")


def no_weights(spec) -> dict[str, tuple[int, ...]]:
    return {}
