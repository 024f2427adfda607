"""Llama on the CPU backends matches transformers' LlamaForCausalLM built from the same config
and weights: logits, loss and every gradient (mapped back to Hugging Face names), float32."""

from __future__ import annotations

import pytest
import torch

import crosschip
from helpers import assert_rel_close, assert_training_parity, rel_err, save_hf_llama

TOL = 1e-5

CONFIGS = {
    # GQA ratio 4, untied
    "gqa4": dict(),
    # MHA (ratio 1), tied embeddings, attention and MLP biases
    "mha_tied_bias": dict(num_key_value_heads=8, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    # GQA ratio 7 with head_dim != hidden / heads
    "gqa7_headdim": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1, head_dim=16),
    # Llama 3.1 style rope scaling
    "llama3_rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
    "linear_rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "yarn_rope": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32}),
}


def _run(model, ids, attention_mask=None):
    out = model(ids, attention_mask=attention_mask, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_matches_transformers(tmp_path, backend, name):
    hf = save_hf_llama(tmp_path, **CONFIGS[name])
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    model = crosschip.from_pretrained(tmp_path, backend=backend)
    assert model.runtime.report.backends_for("qkv_projection") == {backend}
    assert_training_parity(model, hf, ids, TOL)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_llama_left_padding_matches_transformers(tmp_path, backend):
    hf = save_hf_llama(tmp_path)
    torch.manual_seed(2)
    ids = torch.randint(0, hf.config.vocab_size, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :1] = 0
    expected = hf(ids, attention_mask=mask).logits
    model = crosschip.from_pretrained(tmp_path, backend=backend)
    got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_rel_close(got[keep], expected[keep], TOL, "logits at real tokens")


def test_mixed_backends_match(tmp_path):
    """torch projections with reference attention, and the reverse, give the same logits."""
    save_hf_llama(tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    base = crosschip.from_pretrained(tmp_path, backend="reference")(ids).logits
    mixed = crosschip.from_pretrained(tmp_path, backend="torch", components={"attention": "reference"})
    assert mixed.runtime.report.backends_for("attention") == {"reference"}
    assert mixed.runtime.report.backends_for("qkv_projection") == {"torch"}
    assert_rel_close(mixed(ids).logits, base, TOL, "mixed logits")


def test_bf16_logits_within_bf16_tolerance(tmp_path):
    hf = save_hf_llama(tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    expected = hf(ids).logits
    # The budget is transformers' own bf16 error on the same model (measured ~6e-3), not a constant.
    own = rel_err(hf.to(torch.bfloat16)(ids).logits.float(), expected)
    for backend in ("reference", "torch"):
        model = crosschip.from_pretrained(tmp_path, backend=backend, dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        assert_rel_close(model(ids).logits.float(), expected, 2 * own + 1e-3, f"{backend} bf16 logits")


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_changes_nothing_numerically(tmp_path, policy):
    save_hf_llama(tmp_path, num_hidden_layers=3)
    ids = torch.randint(0, 128, (2, 16))
    plain = crosschip.from_pretrained(tmp_path, backend="torch").train()
    ckpt = crosschip.from_pretrained(tmp_path, backend="torch", activation_checkpointing=policy).train()
    assert [ckpt.runtime.checkpoint_layer(i) for i in range(3)] == (
        [True, True, True] if policy == "full" else [True, False, True])
    calls = [0, 0, 0]
    for i, layer in enumerate(ckpt.model.layers):
        layer.register_forward_pre_hook(lambda *args, i=i: calls.__setitem__(i, calls[i] + 1))
    a, b = _run(plain, ids), _run(ckpt, ids)
    # A checkpointed layer runs again during backward to rebuild its activations.
    assert calls == ([2, 2, 2] if policy == "full" else [2, 1, 2])
    assert torch.equal(a.loss, b.loss)
    grads_a, grads_b = plain.hf_grads(), ckpt.hf_grads()
    assert set(grads_a) == set(grads_b)
    for key in grads_a:  # the recomputation repeats the same ops: bitwise
        assert torch.equal(grads_b[key], grads_a[key]), key
