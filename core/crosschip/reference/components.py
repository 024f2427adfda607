"""Plain-torch modules of the reference backend. Each mirrors the matching transformers code so
parity holds to float32 rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from crosschip.lora.sites import adapt
from crosschip.modeling.masks import AttentionMask, allowed
from crosschip.modeling.rope import (
    RopeTables,
    apply_rotary,
    long_inverse_frequencies,
    per_forward_inverse_frequencies,
    rope_inverse_frequencies,
)
from crosschip.specs import (
    AttentionSpec,
    EmbeddingSpec,
    GatedMLPSpec,
    LayerNormSpec,
    LinearSpec,
    LMHeadSpec,
    LossSpec,
    MLPSpec,
    NormSpec,
    QKVSpec,
    RopeSpec,
)


class Embedding(nn.Module):
    def __init__(self, spec: EmbeddingSpec):
        super().__init__()
        self.padding_idx = spec.padding_idx
        self.weight = nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx)


class RMSNorm(nn.Module):
    def __init__(self, spec: NormSpec):
        super().__init__()
        self.eps = spec.eps
        self.offset = spec.offset
        # Initialised to scale by one: a weight of one, or of zero where the offset adds it.
        self.weight = nn.Parameter(torch.full((spec.hidden_size,), 1.0 - spec.offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma's RMSNorm scales in float32 by (offset + weight), then casts.
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        # Normalise in float32, scale in the input dtype, as transformers' LlamaRMSNorm.
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    """``torch.nn.functional.layer_norm``, as ``torch.nn.LayerNorm`` (GPT-NeoX, GPT-2, Phi)."""

    def __init__(self, spec: LayerNormSpec):
        super().__init__()
        self.eps = spec.eps
        self.weight = nn.Parameter(torch.ones(spec.hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size)) if spec.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class QKVProjection(nn.Module):
    """Separate q, k and v projections; returns ``[batch, seq, heads, head_dim]`` tensors."""

    lora_sites = {"q_proj.weight": "q_proj", "k_proj.weight": "k_proj", "v_proj.weight": "v_proj"}

    def __init__(self, spec: QKVSpec):
        super().__init__()
        self.spec = spec
        self.q_proj = nn.Linear(spec.hidden_size, spec.q_size, bias=spec.bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=spec.bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=spec.bias)

    def forward(self, hidden: torch.Tensor):
        shape = hidden.shape[:-1]
        d = self.spec.head_dim
        return (
            self.q_proj(hidden).view(*shape, -1, d),
            self.k_proj(hidden).view(*shape, -1, d),
            self.v_proj(hidden).view(*shape, -1, d),
        )


class Linear(nn.Linear):
    lora_sites = {"weight": ""}

    def __init__(self, spec: LinearSpec):
        super().__init__(spec.in_features, spec.out_features, bias=spec.bias)


class GatedMLP(nn.Module):
    lora_sites = {"gate_proj.weight": "gate_proj", "up_proj.weight": "up_proj", "down_proj.weight": "down_proj"}

    def __init__(self, spec: GatedMLPSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=spec.bias)
        self.up_proj = nn.Linear(h, i, bias=spec.bias)
        self.down_proj = nn.Linear(i, h, bias=spec.bias)
        self.act_fn = ACT2FN[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """``down(act(up(x)))``: the non-gated feed-forward block."""

    lora_sites = {"up_proj.weight": "up_proj", "down_proj.weight": "down_proj"}

    def __init__(self, spec: MLPSpec):
        super().__init__()
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.bias)
        self.act_fn = ACT2FN[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class Rotary(nn.Module):
    """cos/sin tables from transformers' rope initialisers; applied with rotate-half."""

    def __init__(self, spec: RopeSpec):
        super().__init__()
        self.spec = spec
        inv_freq, self.attention_scaling = rope_inverse_frequencies(spec)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long_inverse_frequencies(spec), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) frequencies after ``to_empty``."""
        device = self.inv_freq.device
        self.inv_freq, self.attention_scaling = rope_inverse_frequencies(self.spec, device)
        self.long_inv_freq = long_inverse_frequencies(self.spec, device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        inv_freq = per_forward_inverse_frequencies(self.spec, self.inv_freq, self.long_inv_freq, position_ids)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return RopeTables(cos, sin)

    def apply(self, q: torch.Tensor, k: torch.Tensor, tables: RopeTables):
        return apply_rotary(q, k, tables)


class EagerAttention(nn.Module):
    """Softmax attention written out, as transformers' eager path (float32 softmax)."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, mask: AttentionMask | None = None) -> torch.Tensor:
        spec = self.spec
        batch, q_len = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, seq, d]
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * spec.softmax_scale
        if spec.softcap is not None:  # before the mask, as Gemma 2
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        keep = allowed(q_len, k.shape[2], causal=spec.causal, sliding_window=spec.sliding_window,
                       mask=mask, device=q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        # At least float32; never narrower than the scores, or float64's finfo.min (the masked
        # value) overflows to -inf and a fully masked row (a padding query) turns NaN.
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
        probs = F.dropout(probs, p=spec.dropout, training=self.training)
        out = torch.matmul(probs, v).transpose(1, 2)
        return out.reshape(batch, q_len, -1)


class LMHead(nn.Module):
    lora_sites = {"weight": None}  # forward applies them (before the logits divisor)

    def __init__(self, spec: LMHeadSpec):
        super().__init__()
        self.spec = spec
        self._tied_to: list[nn.Module] = []  # a list, so the embedding is not a submodule
        if not spec.tied:
            self.weight = nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size))
            nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(spec.vocab_size)) if spec.bias else None

    def tie_weights(self, embedding: nn.Module) -> None:
        self._tied_to[:] = [embedding]

    def output_weight(self) -> torch.Tensor:
        if self.spec.tied:
            if not self._tied_to:
                raise RuntimeError("tied lm_head used before tie_weights(embedding) was called")
            return self._tied_to[0].weight
        return self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = adapt(self, "weight", hidden, F.linear(hidden, self.output_weight(), self.bias))
        if self.spec.logits_divisor != 1.0:
            logits = logits / self.spec.logits_divisor
        if self.spec.softcap is not None:
            logits = torch.tanh(logits / self.spec.softcap) * self.spec.softcap
        return logits


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over non-ignored labels, in float32, as transformers'
    ForCausalLMLoss (labels are shifted here, not by the caller)."""

    def __init__(self, spec: LossSpec):
        super().__init__()
        self.spec = spec

    def forward(self, hidden, labels, lm_head, logits=None) -> torch.Tensor:
        if logits is None:
            logits = lm_head(hidden)
        return self.cross_entropy(logits, self.shift(labels).to(logits.device))

    def shift(self, labels) -> torch.Tensor:
        """Each position's target: the next label; the last position's is ignored."""
        return F.pad(labels, (0, 1), value=self.spec.ignore_index)[..., 1:]

    def cross_entropy(self, logits, targets) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` ``[..., vocab]`` against ``targets`` ``[...]``."""
        logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=self.spec.ignore_index)
