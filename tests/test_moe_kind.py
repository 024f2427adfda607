"""The ``moe`` component kind against transformers' own MoE blocks (Qwen3-MoE, Mixtral, Qwen2-MoE
with its gated shared expert), its auxiliary loss against transformers' load_balancing_loss_func,
and the torch backend's grouped experts (stacked layout, one grouped GEMM per projection)
against the reference."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip.components.moe import load_balancing_loss
from crosschip.specs import MoESpec
from crosschip.testing import conformance
from helpers import assert_rel_close

H, I, E = 32, 16, 6  # noqa: E741


def _transformers_block(family: str, top_k: int, **extra):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if family == "mixtral":
        config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=top_k)
        return MixtralSparseMoeBlock(config), MoESpec(H, I, E, top_k, norm_topk_prob=True)
    if family == "qwen2_moe":
        config = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=top_k,
                                shared_expert_intermediate_size=24, norm_topk_prob=False)
        return Qwen2MoeSparseMoeBlock(config), MoESpec(H, I, E, top_k, shared_intermediate_size=24, shared_gate=True)
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=top_k,
                            **extra)
    return Qwen3MoeSparseMoeBlock(config), MoESpec(H, I, E, top_k, norm_topk_prob=config.norm_topk_prob)


def _copy_weights(theirs, ours) -> None:
    """transformers keeps experts stacked ([E, 2I, H] gate then up halves; [E, H, I] down)."""
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        ours.router.weight.copy_(theirs.gate.weight)
        for e, expert in enumerate(ours.experts):
            gate, up = theirs.experts.gate_up_proj[e].chunk(2)
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(theirs.experts.down_proj[e])
        if hasattr(theirs, "shared_expert"):
            for r in ("gate", "up", "down"):
                getattr(ours.shared, f"{r}_proj").weight.copy_(getattr(theirs.shared_expert, f"{r}_proj").weight)
            ours.shared_gate.weight.copy_(theirs.shared_expert_gate.weight)


@pytest.mark.parametrize("family,top_k,extra", [("qwen3_moe", 2, {"norm_topk_prob": True}),
                                                ("qwen3_moe", 3, {"norm_topk_prob": False}),
                                                ("mixtral", 2, {}), ("qwen2_moe", 2, {})])
def test_reference_matches_transformers_block(family, top_k, extra):
    torch.manual_seed(0)
    theirs, spec = _transformers_block(family, top_k, **extra)
    ours = crosschip.Runtime("reference", device="cpu").moe(spec)
    _copy_weights(theirs, ours)
    x = torch.randn(2, 7, H)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = theirs(x1)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got, logits = ours(x2)
    assert_rel_close(got, expected, 1e-6, f"{family} output")
    assert_rel_close(logits, torch.nn.functional.linear(x.reshape(-1, H), theirs.gate.weight), 1e-6, "router logits")
    weight = torch.randn_like(got)
    (expected * weight).sum().backward()
    (got * weight).sum().backward()
    assert_rel_close(x2.grad, x1.grad, 1e-6, f"{family} input gradient")
    assert_rel_close(ours.router.weight.grad, theirs.gate.weight.grad, 1e-6, "router gradient")
    for e, expert in enumerate(ours.experts):
        gate, up = theirs.experts.gate_up_proj.grad[e].chunk(2)
        assert_rel_close(expert.gate_proj.weight.grad, gate, 1e-6, f"expert {e} gate gradient")
        assert_rel_close(expert.down_proj.weight.grad, theirs.experts.down_proj.grad[e], 1e-6, f"expert {e} down")


def test_auxiliary_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = tuple(torch.randn(12, E) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    for attention_mask in (None, mask):
        expected = load_balancing_loss_func(logits, E, 2, attention_mask)
        torch.testing.assert_close(load_balancing_loss(logits, E, 2, attention_mask), expected, rtol=1e-6, atol=0)


def test_top_k_larger_than_the_experts_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"top_k \(5\) is larger than the number of experts \(4\)"):
        MoESpec(32, 16, 4, 5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_moe_kind_conforms(backend):
    report = conformance.check_backend(backend, ["moe"])
    assert len(report.passed) == 1 + 2 * 5 and not report.declined


def _pair(spec, dtype=torch.float32):
    """The same random canonical weights in a reference and a torch-backend MoE."""
    ref = crosschip.Runtime("reference", device="cpu", dtype=dtype).moe(spec).to(dtype)
    grouped = crosschip.Runtime("torch", device="cpu", dtype=dtype).moe(spec).to(dtype)
    assert type(grouped).__name__ == "GroupedExperts"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        grouped.router.weight.copy_(ref.router.weight)
        for e, expert in enumerate(ref.experts):
            gate_up = torch.stack([expert.gate_proj.weight, expert.up_proj.weight], 1).reshape(-1, spec.hidden_size)
            grouped.gate_up_proj[e].copy_(gate_up)
            grouped.down_proj[e].copy_(expert.down_proj.weight)
    return ref, grouped


@pytest.mark.parametrize("routing", ["one-expert-for-all", "idle-experts"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["grouped-gemm", "loop-fallback"])
def test_grouped_experts_route_like_the_reference_at_the_edges(routing, dtype):
    from crosschip_torch.moe import grouped_mm_runs

    spec = MoESpec(32, 16, 8, 1 if routing == "one-expert-for-all" else 2)
    ref, grouped = _pair(spec, dtype)
    with torch.no_grad():
        for module in (ref, grouped):
            if routing == "one-expert-for-all":
                module.router.weight.zero_()
                module.router.weight[3] = 1.0  # x @ w3 > 0 for the inputs below: expert 3 wins
            else:
                module.router.weight[4:] = -10.0  # experts 4..7 never chosen
    x = torch.rand(2, 6, 32, dtype=dtype) + 0.1
    assert grouped_mm_runs(x.reshape(-1, 32), grouped.down_proj.transpose(1, 2)) == (dtype == torch.float32)
    (expected, _), (got, logits) = ref(x), grouped(x)
    chosen = torch.topk(logits, spec.top_k).indices
    assert (chosen == 3).all() if routing == "one-expert-for-all" else (chosen < 4).all()
    assert_rel_close(got, expected, 1e-6, routing)
    got.sum().backward()
    assert torch.count_nonzero(grouped.down_proj.grad[4:] if routing == "idle-experts" else
                               grouped.down_proj.grad[:3]) == 0  # experts no token reached get zero gradients


@pytest.mark.cuda
def test_grouped_experts_on_cuda_bf16_match_the_reference():
    """The grouped GEMM path (bf16, compute capability 8.0+) against the reference in float32 on
    the same bf16-rounded weights: within the conformance kit's bf16 tolerance."""
    from crosschip_torch.moe import grouped_mm_runs

    report = conformance.check_backend("torch", ["moe"], device="cuda", dtype=torch.bfloat16)
    assert len(report.passed) == 1 + 2 * 5 and not report.declined
    spec = MoESpec(256, 128, 16, 4, norm_topk_prob=True)
    grouped = crosschip.Runtime("torch", device="cuda", dtype=torch.bfloat16).moe(spec).cuda().bfloat16()
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    assert grouped_mm_runs(x, grouped.down_proj.transpose(1, 2)) == (torch.cuda.get_device_capability() >= (8, 0))


@pytest.mark.cuda
def test_grouped_experts_make_no_host_sync_on_cuda():
    """Token routing, permutation and the grouped GEMMs stay on the device, forward and backward:
    torch's sync debug mode turns any synchronising call into an error."""
    spec = MoESpec(256, 128, 16, 4, norm_topk_prob=True)
    grouped = crosschip.Runtime("torch", device="cuda", dtype=torch.bfloat16).moe(spec).cuda().bfloat16()
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grouped(x)[0].sum().backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped(x)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
