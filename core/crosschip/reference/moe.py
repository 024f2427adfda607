"""The reference mixture of experts: transformers' math written out (a loop over the experts a
token batch reaches), one ``nn.Linear`` per expert projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from crosschip.components.moe import MoESpec


class Expert(nn.Module):
    """One gated MLP (bias-free, as every MoE family's experts)."""

    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def route(spec: MoESpec, router_logits: torch.Tensor):
    """``(weights [tokens, top_k], experts [tokens, top_k])`` from the router logits: scores in
    float32 (softmax or sigmoid), the top k, renormalised over them when the spec says so, cast
    back to the logits' dtype (Qwen3-MoE, OLMoE; Mixtral always renormalises)."""
    if spec.scoring == "softmax":
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    else:
        scores = torch.sigmoid(router_logits.float())
    weights, experts = torch.topk(scores, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


class MixtureOfExperts(nn.Module):
    lora_sites = {}  # adapters on experts are not offered (yet); the model declines them by name

    def __init__(self, spec: MoESpec):
        super().__init__()
        self.spec = spec
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(spec.hidden_size, spec.intermediate_size, spec.activation)
                                     for _ in range(spec.num_experts))
        if spec.shared_intermediate_size is not None:
            self.shared = Expert(spec.hidden_size, spec.shared_intermediate_size, spec.activation)
            self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False) if spec.shared_gate else None

    def forward(self, hidden: torch.Tensor):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        router_logits = self.router(x)
        weights, chosen = route(self.spec, router_logits)
        out = torch.zeros_like(x)
        hit = F.one_hot(chosen, self.spec.num_experts).permute(2, 1, 0)  # [expert, k, token]
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(hit[e])
            if token.numel() == 0:
                continue  # (eager reference: a data-dependent branch is fine here)
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.spec.shared_intermediate_size is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out.reshape(shape), router_logits
