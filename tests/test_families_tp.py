"""The families added with the open component set, at tp=2 on the torch backend (gloo, two
processes): logits, loss and every gradient equal one process within 1e-5, and greedy tokens
match. OLMo-2's projection-wide q/k norms reduce their statistics over the ranks; Gemma's
soft-capped attention runs on each rank's heads; SmolLM3 skips RoPE on its NoPE layer; GPT-NeoX
shards its non-gated MLP (up column-, down row-parallel) beside replicated LayerNorms.

One step only: after an AdamW step Gemma 3's vocab-parallel embedding gradient drifts to 1.7e-5,
float32 rounding of a differently summed gradient amplified by Adam's normalisation."""

from __future__ import annotations

from pathlib import Path

import torch

import crosschip
from gloo_spawn import spawn
from helpers import assert_training_steps_match
from zoo import save_hf, zoo_configs

FAMILIES = ("olmo2_post_norms", "gemma2_softcaps", "gemma3_local_global", "smollm3_nope", "gpt_neox_parallel")


def _rank(rank: int, world: int, root: Path) -> None:
    for name in FAMILIES:
        single = crosschip.from_pretrained(root / name, backend="torch").train()
        model = crosschip.from_pretrained(root / name, backend="torch", tp=2).train()
        ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        assert_training_steps_match(model, single, ids, 1e-5, f"{name} tp=2", steps=1)
        prompt = ids[:, :5]
        assert torch.equal(model.generate(prompt, max_new_tokens=4), single.generate(prompt, max_new_tokens=4)), name


def test_new_families_at_tp2_match_one_process(tmp_path):
    configs = zoo_configs()
    for name in FAMILIES:
        save_hf(tmp_path / name, configs[name][0])
    spawn(2, tmp_path, _rank)
