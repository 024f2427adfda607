"""GPT-NeoX (Pythia) against transformers' own model, float32 on CPU: both residual variants,
rotary on a quarter or all of each head, with and without attention biases, untied or tied
embed_out. Logits, loss and every gradient (under transformers' names) within 1e-5 on reference
and torch; a saved checkpoint transformers loads bit for bit; greedy tokens equal transformers'
greedy generate; AdamW lowers the loss; tp=2 on torch (two gloo processes) equals one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import crosschip
import crosschip.models.gpt_neox  # registers the family wherever models/__init__ does not import it
from gloo_spawn import spawn
from helpers import assert_rel_close, assert_training_parity, assert_training_steps_match
from zoo import save_hf

TOL = 1e-5


def neox_config(**overrides):
    from transformers import GPTNeoXConfig

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, layer_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="gelu")
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)


# head_dim 16: rotary_pct 0.25 rotates 4 of its 16 dims, 1.0 all of them. A non-default base
# checks that rotary_emb_base reaches the rotary tables (transformers reads it into rope_parameters).
CONFIGS = {
    "parallel_quarter_rotary_bias": dict(use_parallel_residual=True, rotary_pct=0.25, attention_bias=True),
    "sequential_full_rotary_nobias": dict(use_parallel_residual=False, rotary_pct=1.0, attention_bias=False),
    "parallel_full_rotary_nobias": dict(use_parallel_residual=True, rotary_pct=1.0, attention_bias=False,
                                        rotary_emb_base=1000),
    "sequential_quarter_rotary_bias": dict(use_parallel_residual=False, rotary_pct=0.25, attention_bias=True,
                                           hidden_act="gelu_new"),
    # embed_out shares embed_in's weight (transformers then saves no embed_out).
    "parallel_tied": dict(use_parallel_residual=True, rotary_pct=0.25, attention_bias=True, tie_word_embeddings=True),
}


def ids_for(seed: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(tmp_path, backend, name):
    hf = save_hf(tmp_path, neox_config(**CONFIGS[name]))
    model = crosschip.from_pretrained(tmp_path, backend=backend, dtype=torch.float32)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    # Every weight transformers saves, by exactly its name, and nothing else (in memory
    # transformers calls embed_out lm_head; its checkpoints say embed_out).
    assert set(model.hf_state_dict()) == set(load_file(tmp_path / "model.safetensors"))
    assert_training_parity(model, hf, ids_for(1), TOL)


def test_partial_rotary_given_as_rope_parameters(tmp_path):
    """transformers 5 keeps rotary_pct as rope_parameters' partial_rotary_factor; a config that
    gives the factor (and base) there directly rotates as transformers does."""
    rope = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    hf = save_hf(tmp_path, neox_config(rope_parameters=rope))
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5
    model = crosschip.from_pretrained(tmp_path, backend="torch", dtype=torch.float32)
    assert_training_parity(model, hf, ids_for(6), TOL)


def test_fused_qkv_is_per_head_q_k_v():
    """With one query head per KV head, InterleaveQKV is exactly GPT-NeoX's per-head
    ``[q_h; k_h; v_h]``: split the fused tensor the way transformers' attention does
    (``view(..., heads, 3 * head_dim)`` then ``chunk(3)``) and get q, k, v back bitwise."""
    from crosschip.weights.layouts import InterleaveQKV

    heads, head_dim, hidden = 4, 16, 64
    transform = InterleaveQKV("q", "k", "v", "qkv", heads, heads, head_dim)
    for tail in ((hidden,), ()):  # weight and bias
        q, k, v = (torch.randn(heads * head_dim, *tail) for _ in range(3))
        fused = transform.apply({"q": q, "k": k, "v": v})["qkv"]
        per_head = fused.reshape(heads, 3 * head_dim, *tail)
        for got, want in zip(per_head.chunk(3, dim=1), (q, k, v)):
            assert torch.equal(got.reshape(heads * head_dim, *tail), want)
        back = transform.invert({"qkv": fused})
        assert all(torch.equal(back[r], t) for r, t in zip("qkv", (q, k, v)))


@pytest.mark.parametrize("name", ["parallel_quarter_rotary_bias", "sequential_full_rotary_nobias", "parallel_tied"])
def test_save_pretrained_loads_bitwise_in_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf = save_hf(tmp_path / "in", neox_config(**CONFIGS[name]))
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch", dtype=torch.float32)
    with torch.no_grad():  # move off the loaded values so the round trip cannot pass by reading "in"
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "out", max_shard_size="50KB")
    # The files hold exactly the keys transformers itself writes (no missing or unexpected keys).
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_file(tmp_path / "in" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ours, theirs = model.hf_state_dict(), reloaded.state_dict()
    assert set(theirs) == set(hf.state_dict())
    # transformers' lm_head is saved as embed_out, or not at all when tied to embed_in.
    head = "gpt_neox.embed_in.weight" if hf.config.tie_word_embeddings else "embed_out.weight"
    for key, value in theirs.items():
        mine = ours[head if key == "lm_head.weight" else key]
        assert torch.equal(mine, value), key
        assert not torch.equal(value, hf.state_dict()[key]), key
    ids = ids_for(2, (1, 20))
    assert_rel_close(model(ids).logits, reloaded(ids).logits, TOL, "logits after save")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", ["parallel_quarter_rotary_bias", "sequential_full_rotary_nobias"])
def test_greedy_generate_matches_transformers(tmp_path, backend, name):
    hf = save_hf(tmp_path, neox_config(**CONFIGS[name]))
    ids = ids_for(3, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    model = crosschip.from_pretrained(tmp_path, backend=backend, dtype=torch.float32)
    got = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(got, expected), (got, expected)


def test_adamw_steps_lower_the_loss(tmp_path):
    save_hf(tmp_path, neox_config(**CONFIGS["parallel_quarter_rotary_bias"]))
    model = crosschip.from_pretrained(tmp_path, backend="torch", dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = ids_for(4)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


TP_CONFIGS = ("parallel_quarter_rotary_bias", "sequential_full_rotary_nobias", "parallel_tied")


def _tp_rank(rank: int, world: int, root) -> None:
    for name in TP_CONFIGS:
        single = crosschip.from_pretrained(root / name, backend="torch", dtype=torch.float32).train()
        model = crosschip.from_pretrained(root / name, backend="torch", tp=2, dtype=torch.float32).train()
        ids = ids_for(5, (2, 16))
        assert_training_steps_match(model, single, ids, TOL, f"{name} tp=2", steps=2)
        prompt = ids[:, :5]
        assert torch.equal(model.generate(prompt, max_new_tokens=6), single.generate(prompt, max_new_tokens=6)), name


def test_tp2_matches_one_process(tmp_path):
    for name in TP_CONFIGS:
        save_hf(tmp_path / name, neox_config(**CONFIGS[name]))
    spawn(2, tmp_path, _tp_rank)
