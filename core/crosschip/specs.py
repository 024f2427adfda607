"""Semantic specs: what a model asks its runtime for, never how a backend builds it.

Specs are frozen dataclasses so they can key caches and appear in the decision report. Sizes are
the *global* (unsharded) sizes; a backend derives its local shapes from the runtime's parallel
settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from crosschip.errors import ConfigurationError

#: Runtime options, named here (no torch import) so the command line offers the same choices.
PRECISIONS = ("auto", "fp8")
FP8_RECIPES = ("delayed", "current", "block", "mxfp8")
CHECKPOINTING = ("none", "full", "selective")

ParallelStyle = Literal["column", "row", "replicated"]
#: What a norm normalises: the residual stream (``hidden``), each attention head on its own
#: (``head``: Qwen3's q/k norms), or a whole projection's output across its heads
#: (``projection``: OLMo-2's q/k norms). Tensor parallelism splits each differently.
NormScope = Literal["hidden", "head", "projection"]
NORM_SCOPES = ("hidden", "head", "projection")

COMPONENTS = (
    "embedding",
    "qkv_projection",
    "out_projection",
    "gated_mlp",
    "mlp",
    "linear",
    "rms_norm",
    "layer_norm",
    "rotary",
    "attention",
    "lm_head",
    "loss",
)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, found {value!r}")


def _quiet(default, extension: bool = False):
    """A field left out of :func:`describe` while it holds its default (fields added after the
    report format was fixed, so existing reports and logs read as before). An ``extension``
    changes a component's math when set: see :func:`extensions_used`."""
    return field(default=default, metadata={"omit_default": True, "extension": extension})


def extensions_used(spec: Any, fused_input_norm: bool = False) -> list[str]:
    """The math-changing fields ``spec`` sets away from their defaults (``offset``,
    ``softcap``): fields added after plugins were first written, so an implementation built
    before them would silently ignore them. The runtime passes over an implementation that does
    not list them in :attr:`crosschip.ComponentImpl.handles`. With ``fused_input_norm`` (the
    implementation applies the spec's ``input_norm`` itself) the input norm counts too, as
    ``input_norm.<field>``, and a LayerNorm there as ``input_norm=LayerNormSpec``."""
    used = []
    for f in dataclasses.fields(spec):
        if f.metadata.get("extension") and getattr(spec, f.name) != f.default:
            used.append(f.name)
    norm = getattr(spec, "input_norm", None) if fused_input_norm else None
    if norm is not None:
        if isinstance(norm, LayerNormSpec):
            used.append("input_norm=LayerNormSpec")
        used += [f"input_norm.{name}" for name in extensions_used(norm)]
    return used


def _check_scope(name: str, scope) -> None:
    if scope not in NORM_SCOPES:
        raise ValueError(f"{name}.scope must be one of {', '.join(NORM_SCOPES)}, found {scope!r}")


@dataclass(frozen=True)
class NormSpec:
    """RMSNorm over the last dimension: ``(offset + weight) * x / sqrt(mean(x^2) + eps)``.

    ``scope`` says what the last dimension is (see :data:`NormScope`); ``offset`` is 1.0 for
    Gemma's norms, whose stored weight is the difference from one (they then scale in float32,
    as Gemma's own RMSNorm does)."""

    hidden_size: int
    eps: float = 1e-6
    scope: NormScope = _quiet("hidden")
    offset: float = _quiet(0.0, extension=True)

    def __post_init__(self):
        _positive("NormSpec.hidden_size", self.hidden_size)
        _check_scope("NormSpec", self.scope)


@dataclass(frozen=True)
class LayerNormSpec:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight (+ bias)``."""

    hidden_size: int
    eps: float = 1e-5
    bias: bool = True
    scope: NormScope = _quiet("hidden")

    def __post_init__(self):
        _positive("LayerNormSpec.hidden_size", self.hidden_size)
        _check_scope("LayerNormSpec", self.scope)
        if self.scope == "projection":
            raise ValueError("LayerNormSpec.scope='projection' is not supported (no model needs it); "
                             "use 'hidden' or 'head'")


#: The norms a projection may take as its ``input_norm`` (a backend may fuse either).
InputNorm = NormSpec | LayerNormSpec


@dataclass(frozen=True)
class EmbeddingSpec:
    """Token embedding ``[vocab_size, hidden_size]``; ``padding_idx`` gets no gradient."""

    vocab_size: int
    hidden_size: int
    padding_idx: int | None = None

    def __post_init__(self):
        _positive("EmbeddingSpec.vocab_size", self.vocab_size)
        _positive("EmbeddingSpec.hidden_size", self.hidden_size)


@dataclass(frozen=True)
class QKVSpec:
    """Query/key/value projection. ``input_norm`` lets a backend fuse the pre-attention norm."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool = False
    input_norm: InputNorm | None = None
    parallel: ParallelStyle = "column"

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            _positive(f"QKVSpec.{name}", getattr(self, name))
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
    parallel: ParallelStyle = "replicated"
    input_heads: tuple[int, int] | None = None

    def __post_init__(self):
        _positive("LinearSpec.in_features", self.in_features)
        _positive("LinearSpec.out_features", self.out_features)
        if self.parallel not in ("column", "row", "replicated"):
            raise ValueError(f"LinearSpec.parallel must be column, row or replicated, found {self.parallel!r}")
        if self.input_heads is not None:
            heads, kv_heads = self.input_heads
            if heads <= 0 or kv_heads <= 0 or heads % kv_heads or self.in_features % heads:
                raise ValueError(f"LinearSpec.input_heads {self.input_heads} must be (heads, kv_heads) with "
                                 f"kv_heads dividing heads and heads dividing in_features ({self.in_features})")


@dataclass(frozen=True)
class GatedMLPSpec:
    """``down(act(gate(x)) * up(x))``; ``input_norm`` lets a backend fuse the pre-MLP norm."""

    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    bias: bool = False
    input_norm: InputNorm | None = None

    def __post_init__(self):
        _positive("GatedMLPSpec.hidden_size", self.hidden_size)
        _positive("GatedMLPSpec.intermediate_size", self.intermediate_size)
        _check_activation("GatedMLPSpec", self.activation)


@dataclass(frozen=True)
class MLPSpec:
    """``down(act(up(x)))``, not gated (GPT-NeoX, GPT-2, StarCoder2, Phi); ``activation`` is a
    transformers ``ACT2FN`` name (``gelu``, ``gelu_new``, ``gelu_pytorch_tanh``, ``relu``,
    ``silu``...); ``input_norm`` lets a backend fuse the pre-MLP norm."""

    hidden_size: int
    intermediate_size: int
    activation: str = "gelu"
    bias: bool = True
    input_norm: InputNorm | None = None

    def __post_init__(self):
        _positive("MLPSpec.hidden_size", self.hidden_size)
        _positive("MLPSpec.intermediate_size", self.intermediate_size)
        _check_activation("MLPSpec", self.activation)


def _check_activation(name: str, activation: str) -> None:
    from transformers.activations import ACT2CLS

    if activation not in ACT2CLS:
        raise ValueError(f"{name}.activation {activation!r} is not a transformers activation; "
                         f"expected one of {', '.join(sorted(ACT2CLS))}")


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


@dataclass(frozen=True)
class AttentionSpec:
    """Scaled dot-product attention over ``[batch, seq, heads, head_dim]`` inputs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    sliding_window: int | None = None
    scale: float | None = None
    dropout: float = 0.0
    #: Gemma 2's attention logit soft-capping: scores become ``softcap * tanh(scores / softcap)``.
    softcap: float | None = _quiet(None, extension=True)

    def __post_init__(self):
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"AttentionSpec.softcap must be positive or None, found {self.softcap!r}")
        _positive("AttentionSpec.num_heads", self.num_heads)
        _positive("AttentionSpec.num_kv_heads", self.num_kv_heads)
        _positive("AttentionSpec.head_dim", self.head_dim)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim**-0.5


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
    softcap: float | None = _quiet(None, extension=True)

    def __post_init__(self):
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"LMHeadSpec.softcap must be positive or None, found {self.softcap!r}")


@dataclass(frozen=True)
class LossSpec:
    """Next-token cross-entropy, shifted inside the loss as transformers does."""

    vocab_size: int
    ignore_index: int = -100


@dataclass(frozen=True)
class ParallelSpec:
    """Parallel degrees: tensor parallel ``tp``, data parallel ``dp`` (FSDP2: parameters,
    gradients and optimizer state sharded over the ``dp`` ranks, each of which takes its own
    part of the batch), and whether norms and residuals are sharded along the sequence
    (``sequence_parallel``).

    Mixed precision of the data-parallel shards: ``param_dtype`` is the dtype parameters are
    gathered to and computed in (None: their stored dtype), ``reduce_dtype`` the dtype gradients
    are averaged in across the ``dp`` ranks (None: the gradients' own)."""

    tp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    param_dtype: Any = None
    reduce_dtype: Any = None

    def __post_init__(self):
        _positive("ParallelSpec.tp", self.tp)
        _positive("ParallelSpec.dp", self.dp)
        if self.sequence_parallel and self.tp == 1:
            raise ConfigurationError(
                f"{self}: sequence_parallel=True shards the sequence over the tensor-parallel ranks, "
                "so it needs tp > 1")

    @property
    def size(self) -> int:
        """Processes the layout needs: ``tp * dp``."""
        return self.tp * self.dp


def describe(spec: Any) -> str:
    """Short one-line description of a spec for reports and logs."""
    if spec is None:
        return "-"
    parts = []
    for f in dataclasses.fields(spec):
        if not f.compare:
            continue
        value = getattr(spec, f.name)
        if value is None or value is False:
            continue
        if f.metadata.get("omit_default") and value == f.default:
            continue
        if dataclasses.is_dataclass(value):
            value = type(value).__name__
        parts.append(f"{f.name}={value}")
    return f"{type(spec).__name__}({', '.join(parts)})"
