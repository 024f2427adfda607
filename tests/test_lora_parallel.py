"""Adapters under tensor parallelism (torch backend, gloo, CPU) equal one process: logits, loss,
every adapter gradient and a few AdamW steps, with KV heads replicated where tp exceeds them,
with FSDP2 over dp, and with both on a 2-D mesh; the saved adapter is the single process's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crosschip
from gloo_spawn import spawn
from helpers import assert_rel_close, tiny_llama_config
from lora_helpers import ALL, assert_adapter_grads_match, peft_model

TOL = 1e-5


def _run(rank: int, world: int, root: Path, cases) -> None:
    for name, tp, dp, *sp in cases:
        sp = bool(sp and sp[0])
        base, adapter = root / name / "base", root / name / "adapter"
        where = f"{name} tp={tp} dp={dp} sp={sp}"
        single = crosschip.from_pretrained(base, backend="torch", adapter=adapter).train()
        model = crosschip.from_pretrained(base, backend="torch", tp=tp, dp=dp, sequence_parallel=sp,
                                          adapter=adapter).train()
        optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, eps=1e-3)
                      for m in (single, model)]
        torch.manual_seed(1)
        ids = torch.randint(0, 128, (2 * dp, 16))
        part = ids.chunk(dp)[rank // tp] if dp > 1 else ids
        for step in range(3):
            expected = single(ids, labels=ids)
            expected.loss.backward()
            out = model(part, labels=part)
            out.loss.backward()
            if dp == 1:
                assert_rel_close(out.logits, expected.logits, TOL, f"{where} step {step} logits")
                assert abs(out.loss.item() - expected.loss.item()) < TOL, where
            assert_adapter_grads_match(model, single, TOL, f"{where} step {step}")
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        model.save_adapter(root / f"{name}-{tp}-{dp}")
        if rank == 0:
            single.save_adapter(root / f"{name}-single")
            from safetensors.torch import load_file

            a = load_file(root / f"{name}-{tp}-{dp}" / "adapter_model.safetensors")
            b = load_file(root / f"{name}-single" / "adapter_model.safetensors")
            assert set(a) == set(b)
            for key in a:
                assert_rel_close(a[key], b[key], 1e-5, f"{where} saved {key}")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from transformers import Qwen2Config

    from zoo import BASE, zoo_configs

    root = tmp_path_factory.mktemp("lora-tp")
    peft_model(root / "llama", tiny_llama_config(), ALL)
    peft_model(root / "qwen2_dora", Qwen2Config(**BASE), ALL, dora=True)
    phi3, _ = zoo_configs()["phi3_fused"]
    peft_model(root / "phi3", phi3, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), dora=True)
    peft_model(root / "column_dora", Qwen2Config(**BASE), ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
               dora=True)
    return root


def test_tp2_adapter_training_matches_single_process(adapters):
    spawn(2, adapters, _run, [("llama", 2, 1), ("qwen2_dora", 2, 1), ("phi3", 2, 1)])


def test_tp4_with_replicated_kv_heads_matches_single_process(adapters):
    spawn(4, adapters, _run, [("llama", 4, 1), ("qwen2_dora", 4, 1)])


def test_dp2_fsdp2_adapter_matches_single_process(adapters):
    spawn(2, adapters, _run, [("llama", 1, 2)])


def test_tp2_dp2_mesh_adapter_matches_single_process(adapters):
    """A 2-D ("dp", "tp") mesh: FSDP2 over dp, the tp shards' adapter rows and columns over tp."""
    spawn(4, adapters, _run, [("llama", 2, 2), ("qwen2_dora", 2, 2)])


def test_tp2_sequence_parallel_adapter_matches_single_process(adapters):
    """Sequence parallelism: the column-parallel projections see the gathered sequence, and the
    row-parallel ones' updates are reduce-scattered onto each rank's part of it, as their outputs."""
    spawn(2, adapters, _run, [("column_dora", 2, 1, True), ("llama", 2, 1, True), ("qwen2_dora", 2, 1, True)])
