"""``moe``: a mixture-of-experts feed-forward block (router + experts), and the router's
auxiliary load-balancing loss as transformers computes it."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import BATCH, SEQ, randn
from crosschip.components.fields import check_activation, positive
from crosschip.components.kind import ComponentKind, Example

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoESpec:
    """``num_experts`` gated MLPs (``intermediate_size`` each) of which a router picks ``top_k``
    per token, weighting their outputs by the routing probabilities (``scoring`` over the router
    logits), renormalised over the top-k when ``norm_topk_prob``. ``shared_intermediate_size``
    adds a shared expert every token goes through (Qwen2-MoE), scaled by a sigmoid gate when
    ``shared_gate``. The module returns ``(output, router_logits)``; the model sums the routers'
    auxiliary loss with :func:`load_balancing_loss`."""

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    activation: str = "silu"
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    shared_intermediate_size: int | None = None
    shared_gate: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            positive(f"MoESpec.{name}", getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"MoESpec.top_k ({self.top_k}) is larger than the number of experts "
                             f"({self.num_experts})")
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoESpec.scoring must be one of {', '.join(SCORINGS)}, found {self.scoring!r}")
        check_activation("MoESpec", self.activation)
        if self.shared_gate and self.shared_intermediate_size is None:
            raise ValueError("MoESpec.shared_gate needs a shared expert (shared_intermediate_size)")


def _weights(spec: MoESpec) -> dict[str, tuple[int, ...]]:
    h, i = spec.hidden_size, spec.intermediate_size
    shapes = {"router.weight": (spec.num_experts, h)}
    for e in range(spec.num_experts):
        shapes.update({f"experts.{e}.gate.weight": (i, h), f"experts.{e}.up.weight": (i, h),
                       f"experts.{e}.down.weight": (h, i)})
    if spec.shared_intermediate_size is not None:
        s = spec.shared_intermediate_size
        shapes.update({"shared.gate.weight": (s, h), "shared.up.weight": (s, h), "shared.down.weight": (h, s)})
        if spec.shared_gate:
            shapes["shared_gate.weight"] = (1, h)
    return shapes


def _example(spec: MoESpec, options, gen) -> Example:
    return Example({"x": randn(gen, BATCH, SEQ, spec.hidden_size)})


def _call(module, inputs, helpers) -> tuple:
    out, router_logits = module(inputs["x"])
    return out, router_logits


def _layout(spec, ctx):
    from crosschip.weights.layouts import Rename

    roles = {f"experts.{e}.{r}.weight": f"experts.{e}.{r}_proj.weight"
             for e in range(spec.num_experts) for r in ("gate", "up", "down")}
    roles.update({f"shared.{r}.weight": f"shared.{r}_proj.weight" for r in ("gate", "up", "down")})
    return Rename.of(**roles)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """The Switch Transformer auxiliary loss over every MoE layer's ``router_logits`` (a sequence of
    ``[tokens, num_experts]`` tensors), as transformers' ``load_balancing_loss_func``: the fraction
    of top-k assignments per expert times its mean routing probability, summed and scaled by the
    number of experts; padding tokens (``attention_mask`` 0) are left out."""
    import torch

    device = router_logits[0].device
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    flat = attention_mask.reshape(-1).to(device=device, dtype=torch.float32) if attention_mask is not None else None
    for logits in router_logits:
        routing = torch.softmax(logits, dim=-1)
        _, chosen = torch.topk(routing, top_k, dim=-1)
        # Counted with scatter_add, not bincount: no device-to-host synchronisation.
        weight = torch.ones(chosen.numel(), device=device) if flat is None else flat.repeat_interleave(top_k)
        tokens = tokens + torch.zeros(num_experts, device=device).scatter_add_(0, chosen.reshape(-1), weight)
        if flat is None:
            probs = probs + routing.float().sum(dim=0)
            rows = rows + routing.shape[0]
        else:
            probs = probs + (routing.float() * flat.unsqueeze(-1)).sum(dim=0)
            rows = rows + flat.sum()
    return torch.sum((tokens / rows) * (probs / rows).unsqueeze(0)) * num_experts


KIND = ComponentKind(
    name="moe",
    spec=MoESpec,
    weights=_weights,
    reference="crosschip.reference.moe:MixtureOfExperts",
    reference_layout=_layout,
    call=_call,
    example=_example,
    cases=lambda: [
        ("top2-renormalised", MoESpec(32, 16, 4, 2, norm_topk_prob=True), {}),
        ("top1", MoESpec(32, 16, 3, 1), {}),
        ("all-experts", MoESpec(32, 16, 4, 4), {}),
        ("shared-gated", MoESpec(32, 16, 4, 2, shared_intermediate_size=24, shared_gate=True), {}),
        ("sigmoid", MoESpec(32, 16, 6, 2, scoring="sigmoid", norm_topk_prob=True), {}),
    ],
    # Experts whole on every rank under tensor parallelism (expert parallelism shards them).
    tensor_parallel=lambda spec: "replicated",
    summary="mixture of experts: top-k router, gated experts, optional shared expert",
)
