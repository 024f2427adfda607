"""Semantic specs: what a model asks its runtime for, never how a backend builds it.

Specs are frozen dataclasses so they can key caches and appear in the decision report. Sizes are
the *global* (unsharded) sizes; a backend derives its local shapes from the runtime's parallel
settings. Each component's spec is declared with the rest of its kind in
:mod:`crosschip.components`; this module gathers them under one import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from crosschip.components import BUILTIN_NAMES
from crosschip.components.attention import AttentionSpec
from crosschip.components.embedding import EmbeddingSpec
from crosschip.components.fields import NORM_SCOPES, positive
from crosschip.components.gated_mlp import GatedMLPSpec, MLPSpec
from crosschip.components.layer_norm import LayerNormSpec
from crosschip.components.linear import LinearSpec
from crosschip.components.lm_head import LMHeadSpec, LossSpec
from crosschip.components.moe import MoESpec
from crosschip.components.qkv_projection import QKVSpec
from crosschip.components.rms_norm import NormSpec
from crosschip.components.rotary import RopeSpec
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

#: The built-in component kinds (a plugin may register more: see ``crosschip.components``).
COMPONENTS = BUILTIN_NAMES

#: The norms a projection may take as its ``input_norm`` (a backend may fuse either).
InputNorm = NormSpec | LayerNormSpec


def extensions_used(spec: Any, fused_input_norm: bool = False) -> list[str]:
    """The math-changing fields ``spec`` sets away from their defaults (``offset``,
    ``softcap``): fields added after plugins were first written, so an implementation built
    before them would silently ignore them. The runtime passes over an implementation that does
    not list them in :attr:`crosschip.ComponentImpl.handles`. With ``fused_input_norm`` (the
    implementation applies the spec's ``input_norm`` itself) the input norm counts too, as
    ``input_norm.<field>``, and a LayerNorm there as ``input_norm=LayerNormSpec``."""
    if not dataclasses.is_dataclass(spec):
        return []
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


@dataclass(frozen=True)
class ParallelSpec:
    """Parallel degrees: tensor parallel ``tp``, data parallel ``dp`` (FSDP2: parameters,
    gradients and optimizer state sharded over the ``dp`` ranks, each of which takes its own
    part of the batch), and whether norms and residuals are sharded along the sequence
    (``sequence_parallel``).

    Mixed precision of the data-parallel shards: ``param_dtype`` is the dtype parameters are
    gathered to and computed in (None: their stored dtype), ``reduce_dtype`` the dtype gradients
    are averaged in across the ``dp`` ranks (None: the gradients' own).

    Expert parallelism ``ep``: a mixture of experts' experts sharded over the data-parallel
    ranks (each holds ``num_experts / ep`` of every layer's), tokens sent to their experts'
    ranks and back (all-to-all); ``ep`` must divide ``dp``: with ``ep < dp`` the data-parallel
    ranks form ``dp / ep`` groups of ``ep``, each group holding every expert once."""

    tp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    param_dtype: Any = None
    reduce_dtype: Any = None
    ep: int = 1

    def __post_init__(self):
        positive("ParallelSpec.tp", self.tp)
        positive("ParallelSpec.dp", self.dp)
        positive("ParallelSpec.ep", self.ep)
        if self.ep > 1 and self.dp % self.ep:
            raise ConfigurationError(
                f"{self}: ep={self.ep} shards the experts over groups of data-parallel ranks, so it must divide "
                f"dp (found dp={self.dp})")
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


__all__ = [
    "CHECKPOINTING", "COMPONENTS", "FP8_RECIPES", "NORM_SCOPES", "PRECISIONS", "AttentionSpec", "EmbeddingSpec",
    "GatedMLPSpec", "InputNorm", "LMHeadSpec", "LayerNormSpec", "LinearSpec", "LossSpec", "MLPSpec", "MoESpec", "NormScope",
    "NormSpec", "ParallelSpec", "ParallelStyle", "QKVSpec", "RopeSpec", "describe", "extensions_used",
]
