"""neuronx-distributed (NxD) layers behind the core component contracts. Imported only when a
component is built, after :func:`crosschip_neuron.state.ensure` has initialised NxD's parallel
state (its layers read their TP group at construction); every module allocates only this rank's
shard.

The residual stream is ``[batch, seq, hidden]``; under sequence parallelism it is NxD's own
sequence-first ``[seq / tp, batch, hidden]`` (Megatron's layout, which NxD's gathers and
scatters along dim 0 expect: with ``sequence_dimension=1`` its linears' backward fails on the
non-contiguous gathered input). The embedding produces that stream, the column-parallel
projections gather it, the row-parallel ones reduce-scatter back onto it; the QKV projection's
heads and the logits return batch-first.
"""

from __future__ import annotations

import warnings

import torch
from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
from neuronx_distributed.parallel_layers import layers, mappings
from torch import nn
from transformers.activations import ACT2FN

from crosschip.parallel.distributed import check_gated_mlp, check_sequence_divides
from crosschip.parallel.kv_replication import kv_copies
from crosschip.lora.sites import adapt, has_adapters
from crosschip.reference.components import CausalLMLoss as ReferenceCausalLMLoss
from crosschip.specs import EmbeddingSpec, GatedMLPSpec, LinearSpec, LMHeadSpec, QKVSpec
from crosschip_neuron import state
from crosschip_neuron.layout import head_orders, platform
from crosschip_neuron.options import fused_qkv

# NxD wraps its autograd functions in the deprecated torch.cuda.amp.autocast(enabled=False).
warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.autocast", category=FutureWarning,
                        module=r"neuronx_distributed\.")


def _sequence_parallel(ctx) -> bool:
    return ctx.parallel.tp > 1 and ctx.parallel.sequence_parallel


def _sequence_dim(sp: bool):
    return 0 if sp else None


#: Why adapters are declined on neuronx-distributed's layers (crosschip.lora reports it). They
#: apply at any tp (crosschip.lora's hooks on the layers' local outputs), but not under sequence
#: parallelism, where NxD gathers the sequence inside its layers and a hook sees this rank's part.
LORA_DECLINE = ("sequence parallelism: neuronx-distributed gathers the sequence inside its parallel layers, so "
                "an adapter would see only this rank's part of the input; train adapters without "
                "sequence_parallel")
LORA_HEAD_DECLINE = "the neuron backend's vocab-parallel LM head takes no adapter yet"


class _Adapters:
    """The weights that take adapters (``crosschip.lora``'s sites: physical weight -> the
    submodule whose output is its matmul, None where ``forward`` applies them), none under
    sequence parallelism."""

    _lora_sites: dict = {}

    @property
    def lora_sites(self) -> dict:
        return {} if self._sequence_parallel else self._lora_sites


class _SwapFirstDims(torch.autograd.Function):
    """``[a, b, ...] -> [b, a, ...]``, contiguous in both directions: NxD's backward passes view
    their inputs and gradients as 2-D, which a transposed view cannot be."""

    @staticmethod
    def forward(ctx, x):
        return x.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(0, 1).contiguous()


def swap_first_dims(x: torch.Tensor) -> torch.Tensor:
    return _SwapFirstDims.apply(x)


class QKVProjection(_Adapters, GQAQKVColumnParallelLinear):
    """NxD's ``GQAQKVColumnParallelLinear``, fused (``weight_qkv``: this rank's ``[Q_r; K_r;
    V_r]``) or separate (``weight_q``, ``weight_k``, ``weight_v``), with ``kv_size_multiplier``
    copies of each KV head where tp exceeds them (NxD sums their gradients over its KV-shared
    group). NxD cannot build its own biases (its bias initialisation fails), so the biases are
    this module's, local like the weights and added by NxD's forward. Returns
    ``[batch, seq, heads, head_dim]`` tensors of this rank's heads."""

    lora_decline = LORA_DECLINE

    def __init__(self, spec: QKVSpec, ctx):
        tp = ctx.parallel.tp
        copies = kv_copies(spec, tp)
        head_orders(spec, tp)  # the platform's KV arrangement, checked before anything is built
        state.ensure_kv_group(copies, platform())
        fused = fused_qkv()
        super().__init__(spec.hidden_size, [spec.q_size, spec.kv_size], bias=False, gather_output=False,
                         dtype=ctx.dtype, sequence_parallel_enabled=_sequence_parallel(ctx),
                         kv_size_multiplier=copies, fuse_qkv=fused)
        state.track_kv_user(self)
        self.spec = spec
        self.copies = copies
        self._sequence_parallel = _sequence_parallel(ctx)
        self._lora_sites = {"weight_qkv": None} if fused else {f"weight_{r}": None for r in "qkv"}
        if spec.bias:
            q, kv = self.q_output_size_per_partition, self.kv_output_size_per_partition
            if fused:
                self.bias_qkv = nn.Parameter(torch.zeros(q + 2 * kv, dtype=ctx.dtype))
            else:
                self.bias_q = nn.Parameter(torch.zeros(q, dtype=ctx.dtype))
                self.bias_k = nn.Parameter(torch.zeros(kv, dtype=ctx.dtype))
                self.bias_v = nn.Parameter(torch.zeros(kv, dtype=ctx.dtype))

    def forward(self, hidden):
        frozen_fused = self.fuse_qkv and not self.weight_qkv.requires_grad
        q, k, v = self._separate_matmuls(hidden) if frozen_fused else super().forward(hidden)
        if has_adapters(self):  # this rank's rows of each projection: its local q, k, v
            if self.fuse_qkv:
                sizes = [q.shape[-1], k.shape[-1], v.shape[-1]]
                q, k, v = adapt(self, "weight_qkv", hidden, torch.cat([q, k, v], -1)).split(sizes, -1)
            else:
                q, k, v = (adapt(self, f"weight_{r}", hidden, t) for r, t in zip("qkv", (q, k, v)))
        if self.sequence_parallel_enabled:  # gathered [seq, batch, ...]: heads go batch-first
            q, k, v = (swap_first_dims(t) for t in (q, k, v))
        d = self.spec.head_dim
        return q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))


    def _separate_matmuls(self, hidden):
        """NxD's forward on views of a frozen ``weight_qkv`` (a LoRA base): NxD 0.18's GQA
        backward takes a frozen fused weight from its saved tensors as a one-element tuple
        (``_qkvlinear_autograd_base_setup_bwd``) and fails, while its separate-weights path reads
        them right; the same rows, the same products."""
        q_rows, kv_rows = self.q_output_size_per_partition, self.kv_output_size_per_partition
        wq, wk, wv = self.weight_qkv.split([q_rows, kv_rows, kv_rows], 0)
        sp = self.sequence_parallel_enabled
        x = hidden if self.async_tensor_model_parallel_allreduce or sp else \
            mappings.copy_to_tensor_model_parallel_region(hidden)
        q, k, v = self._forward_impl(
            input=x, weight_q=wq, weight_k=wk, weight_v=wv, bias_q=None, bias_k=None, bias_v=None,
            async_grad_allreduce=self.async_tensor_model_parallel_allreduce, sequence_parallel_enabled=sp,
            kv_size_multiplier=self.kv_size_multiplier, weight_qkv=None, bias_qkv=None, fuse_qkv=False,
            output_size_q=q_rows, output_size_kv=kv_rows, reduce_dtype=self.reduce_dtype)
        if self.bias_qkv is not None:
            bq, bk, bv = self.bias_qkv.split([q_rows, kv_rows, kv_rows], 0)
            q, k, v = q + bq, k + bk, v + bv
        return q, k, v


class Linear(_Adapters, layers.RowParallelLinear):
    """The attention output projection: NxD's ``RowParallelLinear`` over this rank's heads (its
    input), reducing (or, sequence parallel, reduce-scattering) the output over the TP group."""

    lora_decline = LORA_DECLINE
    _lora_sites = {"weight": ""}

    def __init__(self, spec: LinearSpec, ctx):
        sp = _sequence_parallel(ctx)
        super().__init__(spec.in_features, spec.out_features, bias=spec.bias, input_is_parallel=True,
                         dtype=ctx.dtype, sequence_parallel_enabled=sp, sequence_dimension=_sequence_dim(sp))
        self._sequence_parallel = sp

    def forward(self, x):
        if self.sequence_parallel_enabled:  # batch-first heads in, this rank's stream part out
            x = swap_first_dims(x)
        return super().forward(x)


class GatedMLP(_Adapters, nn.Module):
    """``gate_up_proj``: one ``ColumnParallelLinear(stride=2)``, so rank r holds ``[gate_r;
    up_r]`` and splits its own output in halves; ``down_proj``: ``RowParallelLinear``."""

    lora_decline = LORA_DECLINE
    _lora_sites = {"gate_up_proj.weight": "gate_up_proj", "down_proj.weight": "down_proj"}

    def __init__(self, spec: GatedMLPSpec, ctx):
        super().__init__()
        check_gated_mlp(spec, ctx.parallel.tp)
        sp = _sequence_parallel(ctx)
        self._sequence_parallel = sp
        common = dict(dtype=ctx.dtype, sequence_parallel_enabled=sp, sequence_dimension=_sequence_dim(sp))
        self.gate_up_proj = layers.ColumnParallelLinear(spec.hidden_size, 2 * spec.intermediate_size,
                                                        bias=spec.bias, gather_output=False, stride=2, **common)
        self.down_proj = layers.RowParallelLinear(spec.intermediate_size, spec.hidden_size, bias=spec.bias,
                                                  input_is_parallel=True, **common)
        self.act_fn = ACT2FN[spec.activation]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class Embedding(layers.ParallelEmbedding):
    """NxD's vocab-parallel ``ParallelEmbedding``: each rank looks up the ids in its vocab range
    and the partial results are summed; sequence parallel, NxD reduce-scatters them onto this
    rank's ``[seq / tp, batch, hidden]`` part of the stream."""

    def __init__(self, spec: EmbeddingSpec, ctx):
        sp = _sequence_parallel(ctx)
        super().__init__(spec.vocab_size, spec.hidden_size, padding_idx=spec.padding_idx, dtype=ctx.dtype,
                         sequence_parallel_enabled=sp)
        # NxD tests `if padding_idx` and so drops index 0; the reference keeps its row's gradient 0.
        p = spec.padding_idx
        self.padding_idx = p - self.start_index if p is not None and self.start_index <= p < self.end_index else None

    def forward(self, input_ids):
        if self.sequence_parallel_enabled:
            check_sequence_divides(input_ids.shape[1], self.tensor_model_parallel_size, "neuron")
        return super().forward(input_ids)


class LMHead(nn.Module):
    """Column-parallel over the vocabulary, as NxD's ``ColumnParallelLinear`` computes it (its
    autograd function, so input gradients are all-reduced over the TP group), with this rank's
    vocab rows: its own, or the embedding's when tied (the same rows: both shard the vocab).
    Returns the logits as a DTensor sharded on the vocab dim at tp > 1 (the loss reads this
    rank's shard; the model gathers them only where logits are returned)."""

    lora_decline = LORA_HEAD_DECLINE

    def __init__(self, spec: LMHeadSpec, ctx):
        super().__init__()
        from neuronx_distributed.parallel_layers import parallel_state

        self.spec = spec
        self.tp = ctx.parallel.tp
        self.sequence_parallel = _sequence_parallel(ctx)
        rows = spec.vocab_size // self.tp
        self._tied_to: list[nn.Module] = []
        if not spec.tied:
            self.weight = nn.Parameter(torch.empty(rows, spec.hidden_size, dtype=ctx.dtype))
        self.bias = nn.Parameter(torch.zeros(rows, dtype=ctx.dtype)) if spec.bias else None
        self.group = parallel_state.get_tensor_model_parallel_group()
        #: Set by the parallel plan: the mesh the vocab-sharded logits live on.
        self.mesh = None

    def tie_weights(self, embedding: nn.Module) -> None:
        self._tied_to[:] = [embedding]

    def output_weight(self):
        return self._tied_to[0].weight if self.spec.tied else self.weight

    def forward(self, hidden):
        sp = self.sequence_parallel
        x = hidden if (sp or self.tp > 1) else mappings.copy_to_tensor_model_parallel_region(hidden)
        logits = layers.linear_with_async_allreduce(
            x, self.output_weight(), None, async_grad_allreduce=self.tp > 1 and not sp,
            sequence_parallel_enabled=sp, sequence_dimension=_sequence_dim(sp), process_group=self.group)
        if sp:  # gathered [seq, batch, vocab / tp]
            logits = swap_first_dims(logits)
        if self.bias is not None:
            logits = logits + self.bias
        if self.spec.logits_divisor != 1.0:
            logits = logits / self.spec.logits_divisor
        if self.spec.softcap is not None:  # elementwise, so this rank's vocab shard alone
            logits = torch.tanh(logits / self.spec.softcap) * self.spec.softcap
        if self.mesh is None:
            return logits
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(logits, self.mesh, (Shard(logits.dim() - 1),), run_check=False)


class CausalLMLoss(ReferenceCausalLMLoss):
    """NxD's ``parallel_cross_entropy`` on vocab-sharded logits (the reference math on whole
    ones): only per-token statistics cross ranks. It subtracts the max from its input in place, so it gets its own float32 copy (the
    logits may be returned to the caller). Ignored targets are masked out of the mean, as
    ``F.cross_entropy(ignore_index=...)`` does."""

    def __init__(self, spec, ctx=None):
        super().__init__(spec)

    def cross_entropy(self, logits, targets) -> torch.Tensor:
        from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy

        if not hasattr(logits, "to_local"):  # whole-vocabulary logits (tp=1, or another backend's head)
            return super().cross_entropy(logits, targets)
        logits = logits.to_local().to(torch.float32, copy=True)
        valid = targets != self.spec.ignore_index
        per_token = parallel_cross_entropy(logits, torch.where(valid, targets, 0))
        valid = valid.to(per_token.dtype)
        return (per_token * valid).sum() / valid.sum()
