"""GPU tests (marked ``cuda``) of adapters: te (the fused norm's output feeds the QKV adapter)
and torch on CUDA against the float32 reference, within the bf16 budget test_cuda.py uses (a
small multiple of the reference's own bf16 error); te's fused MLP declines with its reason."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip.errors import ConfigurationError
from helpers import norm_rel
from lora_helpers import ALL, crosschip_grads, peft_model
from test_cuda import _te_config

pytestmark = pytest.mark.cuda


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.float(), out.loss.float(), {k: g.float() for k, g in crosschip_grads(model).items()}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name", ["llama", "qwen2_bias"])
@pytest.mark.parametrize("backend", ["te", "torch"])
def test_adapter_bf16_matches_reference_within_its_own_bf16_error(tmp_path, backend, name, dora, te_installed):
    _, adapter = peft_model(tmp_path, _te_config(name), ALL, dora=dora, r=8)
    ids = torch.randint(1, 256, (2, 64), device="cuda")
    load = dict(device="cuda", adapter=adapter)
    ref32 = _run(crosschip.from_pretrained(tmp_path / "base", backend="reference", **load).train(), ids)
    ref16 = _run(crosschip.from_pretrained(tmp_path / "base", backend="reference", dtype="bf16", **load).train(), ids)
    components = {"gated_mlp": "torch"} if backend == "te" else None
    model = crosschip.from_pretrained(tmp_path / "base", backend=backend, dtype="bf16", components=components,
                                      **load).train()
    assert model.runtime.report.backends_for("qkv_projection") == {backend}
    got = _run(model, ids)
    for what, i in (("logits", 0), ("loss", 1)):
        assert norm_rel(got[i], ref32[i]) <= 3 * norm_rel(ref16[i], ref32[i]) + 4e-3, what
    assert set(got[2]) == set(ref32[2])
    for key, g32 in ref32[2].items():
        assert norm_rel(got[2][key], g32) <= 3 * norm_rel(ref16[2][key], g32) + 4e-3, key


def test_te_fused_mlp_declines_adapters_with_the_reason(tmp_path, te_installed):
    peft_model(tmp_path, _te_config("llama"))
    model = crosschip.from_pretrained(tmp_path / "base", backend="te", device="cuda", dtype="bf16")
    with pytest.raises(ConfigurationError, match="te.LayerNormMLP fuses"):
        model.add_adapter(crosschip.LoraConfig(target_modules=("up_proj",)))
    assert getattr(model, "lora_adapter", None) is None
