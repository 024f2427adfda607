"""Every model of the zoo on the CPU backends matches its transformers class built from the same
tiny random config and weights (float32 logits, loss and every gradient), and round-trips
through a saved checkpoint that transformers loads."""

from __future__ import annotations

import pytest
import torch

import crosschip
from helpers import assert_rel_close, assert_training_parity
from zoo import save_hf, zoo_configs

TOL = 1e-5
CONFIGS = zoo_configs()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_zoo_matches_transformers(tmp_path, backend, name):
    config, arch = CONFIGS[name]
    hf = save_hf(tmp_path, config)
    assert type(hf).__name__ == arch
    torch.manual_seed(1)
    # Longer than every sliding window and than the dynamic / longrope switch-over lengths.
    ids = torch.randint(1, config.vocab_size, (2, 40))
    model = crosschip.from_pretrained(tmp_path, backend=backend)
    assert type(model).__name__ == arch
    assert_training_parity(model, hf, ids, TOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zoo_checkpoint_round_trip(tmp_path, name):
    from transformers import AutoModelForCausalLM

    config, _ = CONFIGS[name]
    save_hf(tmp_path / "in", config)
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch")
    model.save_pretrained(tmp_path / "out", max_shard_size="50KB")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(1, config.vocab_size, (1, 20))
    assert_rel_close(model(ids).logits, reloaded(ids).logits, TOL, "logits after save")
    again = crosschip.from_pretrained(tmp_path / "out", backend="reference")
    before, after = model.hf_state_dict(), again.hf_state_dict()
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_zoo_bf16_logits_within_bf16_tolerance(tmp_path, backend, name):
    """bf16 logits are as close to float32 transformers as transformers' own bf16 run is (with
    a small factor for a different rounding order), not merely within a loose constant."""
    config, _ = CONFIGS[name]
    hf = save_hf(tmp_path, config)
    ids = torch.randint(1, config.vocab_size, (2, 24))
    expected = hf(ids).logits
    own_bf16 = hf.to(torch.bfloat16)(ids).logits.float()
    budget = 3 * ((own_bf16 - expected).norm() / expected.norm()).item() + 1e-3
    model = crosschip.from_pretrained(tmp_path, backend=backend, dtype=torch.bfloat16)
    got = model(ids).logits.float()
    assert ((got - expected).norm() / expected.norm()).item() <= budget
