"""Modules of the torch backend. Combined projections do one matmul where the reference does
two or three; their row orders (see ``layout.py``) make a dim-0 shard hold whole KV groups and
matching gate/up pairs, which is what column-parallel sharding needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from crosschip.weights.layouts import split_grouped_heads
from crosschip.lora.sites import adapt
from crosschip.modeling.masks import AttentionMask, sdpa
from crosschip.reference.components import MLP as ReferenceMLP
from crosschip.reference.components import CausalLMLoss as ReferenceCausalLMLoss
from crosschip.reference.components import EagerAttention
from crosschip.reference.components import LayerNorm as ReferenceLayerNorm
from crosschip.reference.components import LMHead as ReferenceLMHead
from crosschip.reference.components import RMSNorm as ReferenceRMSNorm
from crosschip.specs import AttentionSpec, EmbeddingSpec, GatedMLPSpec, LinearSpec, QKVSpec
from crosschip_torch.kv_replicas import sum_grads

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: nothing is ever sharded
    DTensor = ()


class CombinedQKV(nn.Linear):
    """One ``[Q_g | K_g | V_g]``-grouped projection; returns ``[batch, seq, heads, head_dim]``.
    Adapters on q, k and v each add their own update at their rows (``crosschip.lora``)."""

    lora_sites = {"weight": None}

    def __init__(self, spec: QKVSpec):
        rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        super().__init__(spec.hidden_size, rows, bias=spec.bias)
        self.spec = spec
        #: Set by the parallel plan when this rank's KV heads are replicas (tp > KV heads).
        self.kv_replicas = None

    def forward(self, hidden: torch.Tensor):
        s = self.spec
        weight, bias = self.weight, self.bias
        if self.kv_replicas is not None:
            weight = sum_grads(weight, self.kv_replicas)
            bias = sum_grads(bias, self.kv_replicas) if bias is not None else None
        out = F.linear(hidden, weight, bias)
        if isinstance(out, DTensor):
            # Column-parallel: split this rank's shard (whole KV groups) into its own heads.
            out = out.to_local()
            hidden = hidden.to_local()
        out = adapt(self, "weight", hidden, out)
        return split_grouped_heads(out, s.group_size, s.head_dim)


class GatedMLP(nn.Module):
    """``gate_up_proj`` rows interleave gate and up: ``[gate_0, up_0, gate_1, up_1, ...]``."""

    lora_sites = {"gate_up_proj.weight": "gate_up_proj", "down_proj.weight": "down_proj"}

    def __init__(self, spec: GatedMLPSpec):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.bias)
        self.act_fn = ACT2FN[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unbind, not two selects: its backward writes both halves' gradients into one tensor
        # (a stack), where each select's would zero-fill a full-size tensor and then add them.
        gate, up = self.gate_up_proj(x).unflatten(-1, (-1, 2)).unbind(-1)
        return self.down_proj(self.act_fn(gate) * up)


class RMSNorm(ReferenceRMSNorm):
    """``torch.nn.functional.rms_norm``: one fused kernel forward and one backward on CUDA, where
    the reference's written-out expression launches about eight each way. Float64 inputs take the
    reference expression, which (as transformers) normalises in float32 whatever the dtype, while
    the fused op would normalise in float64; so do offset norms (Gemma's), which scale in float32.

    A ``projection``-scope norm under tensor parallelism (OLMo-2's q/k norms) sees this rank's
    columns of the projection: the parallel plan shards its weight to match and sets
    :attr:`tp_group`, over which the sum of squares is all-reduced, so every rank normalises by
    the whole projection's statistics."""

    tp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            return self._sharded(x)
        if x.dtype == torch.float64 or self.offset:
            return super().forward(x)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def _sharded(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce  # differentiable

        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        dtype, x32 = x.dtype, x.float()
        squares = all_reduce(x32.pow(2).sum(-1, keepdim=True), group=self.tp_group)
        features = x.shape[-1] * torch.distributed.get_world_size(self.tp_group)
        x32 = x32 * torch.rsqrt(squares / features + self.eps)
        if self.offset:
            return (x32 * (self.offset + weight.float())).to(dtype)
        return weight * x32.to(dtype)


class LayerNorm(ReferenceLayerNorm):
    """The reference LayerNorm (``F.layer_norm`` is already one fused kernel); its own class so
    the parallel plan, which shards only torch-built modules, can take it over."""


class MLP(ReferenceMLP):
    """``up_proj`` column-parallel, ``down_proj`` row-parallel under the plan."""


class Linear(nn.Linear):
    lora_sites = {"weight": ""}

    def __init__(self, spec: LinearSpec):
        super().__init__(spec.in_features, spec.out_features, bias=spec.bias)


class SDPAAttention(nn.Module):
    """``scaled_dot_product_attention`` with native GQA; an explicit boolean mask only when the
    spec or the batch needs one (sliding window, padding, cached keys)."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, mask: AttentionMask | None = None) -> torch.Tensor:
        return sdpa(q, k, v, self.spec, mask, self.spec.dropout if self.training else 0.0)


class SoftcappedAttention(EagerAttention):
    """Attention with logit soft-capping (Gemma 2): ``scaled_dot_product_attention`` has no
    score modifier, so the scores are written out, as transformers' eager path does."""


# -- vocabulary: embedding, LM head, loss --------------------------------------------------------
# nn.Embedding and a linear-like LM head, so torch's parallel styles (RowwiseParallel on the
# embedding: vocab rows; ColwiseParallel on the head: vocab rows, logits sharded on the vocab dim)
# apply to them unchanged. Single-process math is exactly the reference backend's.
class Embedding(nn.Embedding):
    def __init__(self, spec: EmbeddingSpec):
        super().__init__(spec.vocab_size, spec.hidden_size, padding_idx=spec.padding_idx)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # as the reference backend (no zeroed padding row)


class LMHead(ReferenceLMHead):
    """``hidden @ weight.T (+ bias)``, divided by ``logits_divisor``: the reference math (a tied
    head reads the embedding module's weight at every call, so it follows that weight when a
    parallel plan or ``to_empty`` replaces it). Its own class so the torch backend's parallel
    plan, which shards only torch-built modules, can take it over."""


class CausalLMLoss(ReferenceCausalLMLoss):
    """The reference loss; logits sharded on the vocab dim (a DTensor from the vocab-parallel LM
    head) are never gathered: the loss runs under ``loss_parallel`` (see :class:`_LossParallel`)."""

    def cross_entropy(self, logits, targets) -> torch.Tensor:
        if isinstance(logits, DTensor):
            return _LossParallel.apply(logits.to_local(), targets, logits.device_mesh, logits.placements,
                                       logits.shape, logits.stride(), self.spec.ignore_index)
        return super().cross_entropy(logits, targets)


class _LossParallel(torch.autograd.Function):
    """Cross-entropy of vocab-sharded logits under ``torch.distributed.tensor.parallel.
    loss_parallel``, which must be active in the backward pass too, while the caller's
    ``loss.backward()`` runs wherever the caller puts it. So the forward records its own small
    graph (this rank's logits shard -> loss) and the backward replays it under the context.
    Only per-token statistics (max, sum of exponentials, target logit) cross ranks."""

    @staticmethod
    def forward(ctx, local, target, mesh, placements, shape, stride, ignore_index):
        from torch.distributed.tensor.parallel import loss_parallel

        with torch.enable_grad():
            leaf = local.detach().requires_grad_()
            logits = DTensor.from_local(leaf, mesh, placements, run_check=False, shape=shape, stride=stride)
            logits = logits.float()
            with loss_parallel():
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=ignore_index)
            loss = loss.to_local()
        ctx.graph = (leaf, loss)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor.parallel import loss_parallel

        leaf, loss = ctx.graph
        del ctx.graph
        with loss_parallel():
            (local_grad,) = torch.autograd.grad(loss, leaf, grad)
        return local_grad, None, None, None, None, None, None
