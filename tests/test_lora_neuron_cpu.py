"""Adapters on the neuron backend (neuronx-distributed's layers, CPU mode, gloo) equal the
reference backend in one process: logits, loss, every adapter gradient over three AdamW steps,
and the saved adapter, at tp 1, 2 and 4 (KV heads replicated at tp=4, under both platforms'
arrangements), with fused and separate QKV, for Llama and for Qwen2 (QKV biases) with DoRA.
Under sequence parallelism adapters are declined with the reason.

Marked ``neuron_cpu``: skipped without neuronx-distributed, failing where
``CROSSCHIP_REQUIRE_HARDWARE=neuron-cpu`` says it must run (CI)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

import crosschip
from crosschip.weights import whole
from gloo_spawn import spawn
from helpers import assert_rel_close, tiny_llama_config
from lora_helpers import ALL, assert_adapter_grads_match, peft_model

pytestmark = pytest.mark.neuron_cpu

TOL = 1e-5


def _run(rank: int, world: int, root: Path, cases) -> None:
    os.environ["NXD_CPU_MODE"] = "1"
    for name, platform, fused in cases:
        os.environ["NEURON_PLATFORM_TARGET_OVERRIDE"] = platform
        os.environ["CROSSCHIP_NEURON_FUSE_QKV"] = fused
        base, adapter = root / name / "base", root / name / "adapter"
        where = f"{name} tp={world} {platform} fused={fused}"
        single = crosschip.from_pretrained(base, backend="reference", adapter=adapter).train()
        model = crosschip.from_pretrained(base, backend="neuron", tp=world, adapter=adapter, strict=True).train()
        optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, eps=1e-3)
                      for m in (single, model)]
        torch.manual_seed(1)
        ids = torch.randint(0, 128, (2, 16))
        for step in range(3):
            expected = single(ids, labels=ids)
            expected.loss.backward()
            out = model(ids, labels=ids)
            out.loss.backward()
            assert_rel_close(whole(out.logits), expected.logits, TOL, f"{where} step {step} logits")
            assert abs(out.loss.item() - expected.loss.item()) < TOL, where
            assert_adapter_grads_match(model, single, TOL, f"{where} step {step}")
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        saved = root / f"{name}-{world}-{platform}-{fused}"
        model.save_adapter(saved)
        if rank == 0:
            from safetensors.torch import load_file

            single.save_adapter(root / f"{name}-{world}-single")
            a, b = load_file(saved / "adapter_model.safetensors"), load_file(root / f"{name}-{world}-single" / "adapter_model.safetensors")
            assert set(a) == set(b), where
            for key in a:
                assert_rel_close(a[key], b[key], TOL, f"{where} saved {key}")
        del model, optimizers
        gc.collect()


def _sequence_parallel_declines(rank: int, world: int, root: Path) -> None:
    from crosschip.errors import ConfigurationError

    os.environ["NXD_CPU_MODE"] = "1"
    model = crosschip.from_pretrained(root / "llama" / "base", backend="neuron", tp=world, sequence_parallel=True)
    with pytest.raises(ConfigurationError, match="sequence parallelism: neuronx-distributed gathers"):
        model.load_adapter(root / "llama" / "adapter")
    assert getattr(model, "lora_adapter", None) is None


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from transformers import Qwen2Config

    from zoo import BASE

    root = tmp_path_factory.mktemp("lora-neuron")
    peft_model(root / "llama", tiny_llama_config(), ALL)
    peft_model(root / "qwen2_dora", Qwen2Config(**BASE), ALL, dora=True)
    return root


def test_tp1_adapters_match_the_reference(adapters):
    spawn(1, adapters, _run, [("llama", "trn1", "1"), ("qwen2_dora", "trn1", "0")])


def test_tp2_adapters_match_the_reference(adapters):
    spawn(2, adapters, _run, [("llama", "trn1", "1"), ("qwen2_dora", "trn1", "0")])


def test_tp4_with_replicated_kv_heads_matches_the_reference(adapters):
    spawn(4, adapters, _run, [("llama", "trn1", "1"), ("llama", "trn2", "0"), ("qwen2_dora", "trn2", "1")])


def test_sequence_parallelism_declines_adapters_with_the_reason(adapters):
    spawn(2, adapters, _sequence_parallel_declines)


def _train_lora(rank: int, world: int, root: Path) -> None:
    import json

    from helpers import train_interrupted

    os.environ["NXD_CPU_MODE"] = "1"
    losses = train_interrupted(root, "lora", 2, model=str(root / "vocab258"), backend="neuron", tp=world,
                               lora="r=4,alpha=8", steps=4, batch_size=2, seq_len=16, seed=2)
    if rank == 0:
        (root / "lora-losses.json").write_text(json.dumps(losses))


def test_train_lora_on_neuron_resumes_bitwise(adapters):
    """``crosschip train --backend neuron --tp 2 --lora ...``: the adapter trains, saves in PEFT's
    format and an interrupted run resumes to the uninterrupted one's losses and adapter, bit for bit."""
    import json

    from safetensors.torch import load_file

    from helpers import save_hf_llama

    save_hf_llama(adapters / "vocab258", vocab_size=258)  # the built-in corpus's byte vocabulary
    spawn(2, adapters, _train_lora)
    losses = json.loads((adapters / "lora-losses.json").read_text())
    assert losses["resumed"] == losses["full"] and losses["full"][-1] < losses["full"][0], losses
    full = load_file(adapters / "lora-full" / "adapter_model.safetensors")
    resumed = load_file(adapters / "lora-resumed" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
