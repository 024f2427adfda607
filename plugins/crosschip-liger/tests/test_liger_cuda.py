"""The liger backend's kernels on a GPU: crosschip's conformance kit over every component in
bfloat16 and float32 (outputs, input and weight gradients against the reference backend, layouts
bitwise), the fused linear cross-entropy actually taken, and a tiny Llama's forward and backward
against the reference backend. Every test is marked ``cuda`` (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip import LMHeadSpec, LossSpec
from crosschip.testing import conformance
from crosschip.testing.parity import random_transformers_model

pytestmark = pytest.mark.cuda

BACKEND = "liger"
COMPONENTS = ("gated_mlp", "rms_norm", "rotary", "loss")
DTYPES = [torch.bfloat16, torch.float32]
#: The kinds' cases this backend declines, and the start of its reason.
DECLINED = {"gated_mlp[gelu-bias]": "activation 'gelu_pytorch_tanh': crosschip-liger builds Liger's SwiGLU"}
FUSED_LOSS = "LigerFusedLinearCrossEntropyFunctionBackward"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", conformance.cases(BACKEND), ids=str)
def test_parity_with_reference(case, dtype):
    outcome = conformance.check_case(BACKEND, case, device="cuda", dtype=dtype)
    if str(case) in DECLINED:
        assert outcome.declined and outcome.detail.startswith(DECLINED[str(case)]), outcome
    else:
        assert outcome.status == conformance.PASSED, outcome


@pytest.mark.parametrize("case", conformance.cases(BACKEND), ids=str)
def test_layout_round_trip(case):
    outcome = conformance.check_layout(BACKEND, case, device="cuda", dtype=torch.bfloat16)
    expected = conformance.DECLINED if str(case) in DECLINED else conformance.PASSED
    assert outcome.status == expected, outcome


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_kit(dtype):
    report = conformance.check_backend(BACKEND, device="cuda", dtype=dtype)
    cases = {str(case) for case in conformance.cases(BACKEND)}
    assert {str(o.case) for o in report.declined} == set(DECLINED)
    for check in ("parity", "layout"):
        assert {str(o.case) for o in report.passed if o.check == check} == cases - set(DECLINED)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_the_loss_fuses_the_lm_head(dtype, softcap):
    """Given hidden states and the head (no logits), the loss is Liger's fused kernel, and equals
    the head followed by the reference loss; given logits it is the reference loss over them."""
    rt = crosschip.Runtime(components={"loss": BACKEND, "lm_head": "torch"}, device="cuda", dtype=dtype, strict=True)
    head = rt.lm_head(LMHeadSpec(64, 1000, softcap=softcap)).to("cuda", dtype)
    loss = rt.loss(LossSpec(1000))
    assert loss.crosschip_component.backend == BACKEND
    reference_loss = crosschip.Runtime("reference", device="cuda").loss(LossSpec(1000))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 64, generator=gen).to("cuda", dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 17), generator=gen).cuda()
    labels[0, :5] = -100

    fused = loss(hidden, labels, head)
    assert type(fused.grad_fn).__name__ == FUSED_LOSS
    fused.backward()
    got = (fused.detach(), hidden.grad, head.weight.grad)
    hidden.grad, head.weight.grad = None, None
    expected = reference_loss(hidden, labels, head)
    expected.backward()
    tol = conformance.tolerance_for(dtype)
    for name, a, e in zip(("loss", "hidden grad", "weight grad"), got, (expected.detach(), hidden.grad, head.weight.grad)):
        err = ((a.double() - e.double()).abs().max() / e.double().abs().max()).item()
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"

    unfused = loss(hidden, labels, head, head(hidden))
    assert type(unfused.grad_fn).__name__ != FUSED_LOSS
    torch.testing.assert_close(unfused, expected, rtol=0, atol=0)


def _tiny_llama(path, tied: bool):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied)
    random_transformers_model(config, seed=1).save_pretrained(path)
    return config


def _step(model, ids):
    """Logits (a forward without labels), then the loss with the head fused in (no logits asked
    for) and the gradients of every weight by Hugging Face name."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()
    return logits, out.loss.detach().float(), out.loss.grad_fn, {k: v.float() for k, v in model.hf_grads().items()}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_llama_forward_backward_matches_reference(tmp_path, dtype, tol, tied):
    _tiny_llama(tmp_path, tied)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
    reference = crosschip.from_pretrained(tmp_path, backend="reference", device="cuda", dtype=dtype)
    # The way a user asks for it: Liger for what it provides, torch for the rest, strict so that
    # a decline or an unavailable Liger is an error instead of a silent fallback.
    liger = crosschip.from_pretrained(tmp_path, backend="torch", components={c: BACKEND for c in COMPONENTS},
                                      device="cuda", dtype=dtype, strict=True)
    built = {d.component: d.backend for d in liger.runtime.report.decisions}
    assert {c: built[c] for c in COMPONENTS} == {c: BACKEND for c in COMPONENTS}

    logits, loss, grad_fn, grads = _step(liger, ids)
    ref_logits, ref_loss, _, ref_grads = _step(reference, ids)
    assert type(grad_fn).__name__ == FUSED_LOSS

    def rel(a, e):
        return ((a.double() - e.double()).abs().max() / e.double().abs().max()).item()

    assert rel(logits, ref_logits) <= tol
    assert rel(loss, ref_loss) <= tol
    assert set(grads) == set(ref_grads)
    errors = {name: rel(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) <= tol, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
