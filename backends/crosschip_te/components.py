"""Transformer Engine modules behind the core component contracts. Imported only when a
component is built (never by registration), so CPU machines never import transformer_engine.

Under tensor parallelism every module is built with ``tp_size`` and allocates only this rank's
shard; the TP group is handed over once the model is built (see :mod:`crosschip_te.parallel`)."""

from __future__ import annotations

import torch
import transformer_engine.pytorch as te
from torch import nn

from crosschip.parallel.distributed import check_gated_mlp, check_linear
from crosschip.parallel.kv_replication import kv_copies, physical_qkv_spec
from crosschip.weights.layouts import split_grouped_heads
from crosschip.lora.sites import adapt, has_adapters
from crosschip.modeling.masks import AttentionMask, sdpa
from crosschip.specs import (AttentionSpec, GatedMLPSpec, LayerNormSpec, LinearSpec, MLPSpec, NormSpec,
                             QKVSpec)
from crosschip_te import parallel
from crosschip_te.support import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS


def _device(ctx) -> torch.device | str:
    # Inside the core's model build (a meta-device context, see crosschip.checkpoint.loading.build_model)
    # TE builds on meta too, deferring its allocation and initialisation, so that the memory
    # check counts this rank's shards before anything is allocated; TE initialises them after
    # to_empty (TEModules.reset_buffers). Built directly, a component is ready on its GPU.
    # The string "meta": TE tests ``device == "meta"``, which a torch.device never equals, and
    # otherwise materialises meta parameters on the GPU at once.
    if torch.get_default_device().type == "meta":
        return "meta"
    return ctx.device if ctx.device.type == "cuda" else torch.device("cuda")


def _norm_args(norm: NormSpec | LayerNormSpec) -> dict:
    """TE's arguments for a fused input norm (``crosschip_te.support`` has checked TE computes it):
    LayerNorm (always with a bias), or RMSNorm, scaling by ``1 + weight`` in float32 for an
    offset of 1 (TE's ``zero_centered_gamma``)."""
    if isinstance(norm, LayerNormSpec):
        return dict(normalization="LayerNorm", eps=norm.eps)
    return dict(normalization="RMSNorm", eps=norm.eps, zero_centered_gamma=norm.offset == 1.0)


class TEModules(nn.Module):
    """A component holding Transformer Engine modules."""

    #: Why adapters are declined here (crosschip.lora reports it when one is asked for).
    lora_decline = ("tensor parallelism: this backend's shards are plain tensors that crosschip.lora "
                    "cannot place adapters on yet; use tp=1 or the torch backend")
    #: Weights whose adapters this module applies (crosschip.lora), at tp=1.
    _lora_sites: dict = {}

    @property
    def lora_sites(self) -> dict:
        return self._lora_sites if self.tp == 1 else {}

    def reset_buffers(self) -> None:
        """Once allocated from meta (``to_empty``): TE's own deferred initialisation, which also
        sets the attributes its parameters carry (TP partition dims, sequence-parallel marks).
        The checkpoint load then overwrites the values."""
        for module in self.children():
            module.reset_parameters()


class QKVProjection(TEModules):
    """The input norm (RMSNorm or LayerNorm) fused into the QKV matmul (``te.LayerNormLinear``) when the spec carries an input
    norm, else ``te.Linear``. Output rows are grouped ``[Q_g | K_g | V_g]`` per KV head, as the
    torch backend's, so a column shard holds whole KV groups; each rank splits its own output
    (head counts follow from the width)."""

    def __init__(self, spec: QKVSpec, ctx):
        super().__init__()
        tp = self.tp = parallel.tp_degree(ctx)
        # KV heads replicated where tp exceeds them (one whole group per rank), as the layout.
        self.spec = spec = physical_qkv_spec(spec, tp)
        #: Set by the parallel plan when this rank's KV heads are replicas.
        self.kv_replicas = None
        rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        #: Sequence parallel: the input is this rank's ``[seq / tp, batch, hidden]`` part of the
        #: stream, which TE gathers (see :mod:`crosschip_te.sequence_parallel`).
        self.sequence_parallel = parallel.sequence_parallel(ctx, tp)
        common = dict(bias=spec.bias, params_dtype=ctx.dtype, device=_device(ctx), tp_size=tp,
                      parallel_mode="column" if tp > 1 else None, sequence_parallel=self.sequence_parallel)
        if spec.input_norm is not None:
            self.proj = te.LayerNormLinear(spec.hidden_size, rows, **_norm_args(spec.input_norm), **common)
        else:
            self.proj = te.Linear(spec.hidden_size, rows, **common)

    _lora_sites = {"proj.weight": None}

    def forward(self, hidden):
        s = self.spec
        if has_adapters(self):
            # An adapter sees the input of the matmul: with the norm fused in, its output,
            # which LayerNormLinear hands back on request (it computes it anyway).
            fused = isinstance(self.proj, te.LayerNormLinear)
            self.proj.return_layernorm_output = fused
            out = self.proj(hidden)
            out, normed = out if fused else (out, hidden)
            out = adapt(self, "proj.weight", normed, out)
        else:
            if isinstance(self.proj, te.LayerNormLinear):
                self.proj.return_layernorm_output = False
            out = self.proj(hidden)
        if self.sequence_parallel:
            out = out.transpose(0, 1)  # gathered [seq, batch, rows] -> [batch, seq, rows]
        return split_grouped_heads(out, s.group_size, s.head_dim)


class _FusedMLP(TEModules):
    """``te.LayerNormMLP``: the input norm, fc1, the activation and fc2 in one module."""

    lora_decline = ("te.LayerNormMLP fuses the norm, up (and gate), activation and down projections, so "
                    "no adapter can reach their rows; build the MLP with the torch backend "
                    "(components={'gated_mlp': 'torch'} or {'mlp': 'torch'}) for adapters there")
    lora_sites: dict = {}

    def __init__(self, spec, ctx, activation: str):
        super().__init__()
        tp = parallel.tp_degree(ctx)
        check_gated_mlp(spec, tp)  # fc1 column-, fc2 row-parallel: tp divides the intermediate size
        self.mlp = te.LayerNormMLP(spec.hidden_size, spec.intermediate_size, **_norm_args(spec.input_norm),
                                   bias=spec.bias, activation=activation,
                                   params_dtype=ctx.dtype, device=_device(ctx), tp_size=tp,
                                   set_parallel_mode=tp > 1,
                                   sequence_parallel=parallel.sequence_parallel(ctx, tp))

    def forward(self, x):
        return self.mlp(x)


class GatedMLP(_FusedMLP):
    """Gate and up are fc1's halves (see ``crosschip_te.layout``); SwiGLU, GeGLU (tanh), ReGLU..."""

    def __init__(self, spec: GatedMLPSpec, ctx):
        super().__init__(spec, ctx, GATED_ACTIVATIONS[spec.activation])


class MLP(_FusedMLP):
    """Not gated: ``down(act(up(norm(x))))``, up as fc1, down as fc2."""

    def __init__(self, spec: MLPSpec, ctx):
        super().__init__(spec, ctx, PLAIN_ACTIVATIONS[spec.activation])


class Linear(TEModules):
    def __init__(self, spec: LinearSpec, ctx):
        super().__init__()
        tp = self.tp = parallel.tp_degree(ctx)
        check_linear(spec, tp)
        mode = parallel.linear_mode(spec, tp)
        #: Sequence parallel (row-parallel only: the attention output projection): the whole
        #: ``[batch, seq, in]`` input goes in sequence-first, and TE reduce-scatters the output
        #: onto this rank's ``[seq / tp, batch, out]`` part of the stream.
        self.sequence_parallel = mode == "row" and parallel.sequence_parallel(ctx, tp)
        self.proj = te.Linear(spec.in_features, spec.out_features, bias=spec.bias,
                              params_dtype=ctx.dtype, device=_device(ctx), tp_size=tp,
                              parallel_mode=mode, sequence_parallel=self.sequence_parallel)

    _lora_sites = {"proj.weight": "proj"}

    def forward(self, x):
        if self.sequence_parallel:
            x = x.transpose(0, 1).contiguous()
        return self.proj(x)


class RMSNorm(TEModules):
    """``te.RMSNorm``; Gemma's ``(1 + weight)`` (offset 1) is TE's ``zero_centered_gamma``, whose
    kernel adds the 1 to the weight in float32 and scales in float32, as Gemma does."""

    def __init__(self, spec: NormSpec, ctx):
        super().__init__()
        self.norm = te.RMSNorm(spec.hidden_size, eps=spec.eps, zero_centered_gamma=spec.offset == 1.0,
                               params_dtype=ctx.dtype, device=_device(ctx))

    def forward(self, x):
        return self.norm(x)


class LayerNorm(TEModules):
    """``te.LayerNorm`` (always with a bias: ``crosschip_te.support`` declines ``bias=False``)."""

    def __init__(self, spec: LayerNormSpec, ctx):
        super().__init__()
        self.norm = te.LayerNorm(spec.hidden_size, eps=spec.eps, params_dtype=ctx.dtype, device=_device(ctx))

    def forward(self, x):
        return self.norm(x)


class DotProductAttention(nn.Module):
    """``te.DotProductAttention`` (fused kernels, native GQA and sliding window) for full
    sequences; batches with padding, cached keys (generation) or packed documents take the
    masked SDPA path (TE's fused kernels would need its own THD packed format for them)."""

    def __init__(self, spec: AttentionSpec, ctx):
        super().__init__()
        self.spec = spec
        window = None if spec.sliding_window is None else (spec.sliding_window - 1, 0)
        tp = parallel.tp_degree(ctx)
        # Global head counts and tp_size: TE takes this rank's share of each (KV heads counted
        # with their replicas where tp exceeds them, as the QKV projection holds them).
        self.attn = te.DotProductAttention(
            num_attention_heads=spec.num_heads, kv_channels=spec.head_dim,
            num_gqa_groups=spec.num_kv_heads * kv_copies(spec, tp), tp_size=tp,
            attention_dropout=spec.dropout, qkv_format="bshd",
            attn_mask_type="causal" if spec.causal else "no_mask",
            window_size=window, softmax_scale=spec.softmax_scale)

    def forward(self, q, k, v, mask: AttentionMask | None = None):
        spec = self.spec
        if mask is None or mask.is_plain:
            return self.attn(q.contiguous(), k.contiguous(), v.contiguous())
        return sdpa(q, k, v, spec, mask, spec.dropout if self.training else 0.0)
