"""The neuron backend on the real neuronx-distributed (NxD) in its CPU mode (``NXD_CPU_MODE=1``,
gloo): tensor and sequence parallelism at tp 2 and 4 against the reference backend in one
process, for Llama, Qwen2 (QKV biases), Qwen3 (q/k norms) and a model with fewer KV heads than
tp (NxD's ``kv_size_multiplier``), under both platforms' KV-group arrangements: logits, loss,
every gradient under Hugging Face names, the clipped gradient norm, three AdamW steps, the
streamed load and the saved checkpoint. A negative control loads weights laid out for the other
platform: the forward still agrees, the K/V gradients do not.

Marked ``neuron_cpu``: skipped without neuronx-distributed, failing instead where
``CROSSCHIP_REQUIRE_HARDWARE=neuron-cpu`` says it must run (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import crosschip
from gloo_spawn import spawn
from helpers import (assert_parallel_grads_match, assert_rel_close, assert_saves_alike,
                     assert_training_steps_match, rel_err, save_hf_llama)

pytestmark = pytest.mark.neuron_cpu

TOL = 1e-5
PLATFORM = "NEURON_PLATFORM_TARGET_OVERRIDE"


def _save_models(root: Path) -> None:
    """8 query heads and 2 KV heads (tp=2 splits them, tp=4 replicates each twice), and one KV
    head (replicated at every tp); two more that tp=2 cannot split, for the errors."""
    from transformers import Qwen2Config, Qwen3Config
    from zoo import BASE, save_hf

    save_hf_llama(root / "llama")
    save_hf(root / "qwen2", Qwen2Config(**BASE))
    save_hf(root / "qwen3", Qwen3Config(**BASE, head_dim=16))
    save_hf_llama(root / "kv1", num_key_value_heads=1)
    save_hf_llama(root / "heads7", hidden_size=56, num_attention_heads=7, num_key_value_heads=1, head_dim=8)
    save_hf_llama(root / "vocab129", vocab_size=129)
    save_hf_llama(root / "inter95", intermediate_size=95)


def _cpu_mode(platform: str = "trn1", fused: bool = True) -> None:
    os.environ["NXD_CPU_MODE"] = "1"
    os.environ[PLATFORM] = platform
    os.environ["CROSSCHIP_NEURON_FUSE_QKV"] = "1" if fused else "0"


def _step(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return out


def _check_parity(root: Path, name: str, tp: int, platform: str, sp: bool, fused: bool, rank: int) -> None:
    _cpu_mode(platform, fused)
    where = f"{name} tp={tp} {platform} sp={sp} fused={fused}"
    path = root / name
    single = crosschip.from_pretrained(path, backend="reference").train()
    model = crosschip.from_pretrained(path, backend="neuron", tp=tp, sequence_parallel=sp, strict=True).train()
    built = {c: sorted(v) for c, v in ((c, model.runtime.report.backends_for(c)) for c in
                                       ("embedding", "qkv_projection", "out_projection", "gated_mlp", "lm_head",
                                        "loss"))}
    assert all(b == ["neuron"] for b in built.values()), built
    # Streaming load: each rank read exactly what it holds (plus the replicated weights).
    held = sum(p.numel() * 4 for p in model.parameters())
    assert model.checkpoint_bytes_read == held, (where, model.checkpoint_bytes_read, held)
    assert held < single.checkpoint_bytes_read
    assert_saves_alike(model, single, root / f"save-{name}-{tp}-{platform}-{sp}-{fused}", rank, where)

    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 16))
    if not sp:  # greedy tokens equal (the KV cache holds this rank's heads)
        prompt = ids[:, :5]
        assert torch.equal(model.generate(prompt, max_new_tokens=3), single.generate(prompt, max_new_tokens=3))
    assert_training_steps_match(model, single, ids, TOL, where)


def _check_wrong_platform_is_caught(root: Path, tp: int) -> None:
    """Weights laid out for trn1 (tiled KV replicas) in a process whose NxD groups follow trn2
    (adjacent replicas): the forward agrees, the K/V gradients are summed over ranks holding
    other heads, and the gradient check fails."""
    import crosschip_neuron.layout as layout

    _cpu_mode("trn2")
    single = crosschip.from_pretrained(root / "llama", backend="reference").train()
    real = layout.platform
    layout.platform = lambda: "trn1"  # the layout only: NxD's groups were arranged for trn2
    try:
        model = crosschip.from_pretrained(root / "llama", backend="neuron", tp=tp).train()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
        expected, got = _step(single, ids), _step(model, ids)
        assert_rel_close(got.logits, expected.logits, TOL, "wrong-platform logits")
        grads, oracle = model.hf_grads(), single.hf_grads()
        for key in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
            assert rel_err(grads[key], oracle[key]) > 0.05, key  # summed with another head's copies
        with pytest.raises(AssertionError, match="wrong platform grad .* relative error"):
            assert_parallel_grads_match(model, single, TOL, "wrong platform")
    finally:
        layout.platform = real


def _check_errors(root: Path, tp: int) -> None:
    from crosschip.errors import ConfigurationError, StrictFallbackError

    _cpu_mode()
    with pytest.raises(ConfigurationError, match=rf"tp={tp} does not divide the number of query heads \(7\)"):
        crosschip.from_pretrained(root / "heads7", backend="neuron", tp=tp)
    with pytest.raises(ConfigurationError, match=rf"tp={tp} does not divide the intermediate size \(95\)"):
        crosschip.from_pretrained(root / "inter95", backend="neuron", tp=tp)
    with pytest.raises(StrictFallbackError, match=rf"neuron: tp={tp} does not divide the vocabulary \(129\)"):
        crosschip.from_pretrained(root / "vocab129", backend="neuron", tp=tp, strict=True)
    _cpu_mode("trn9")
    with pytest.raises(ConfigurationError, match="platform target 'trn9' .* expected one of trn1, trn1n, inf2"):
        crosschip.from_pretrained(root / "kv1", backend="neuron", tp=tp)
    _cpu_mode()
    with pytest.raises(ConfigurationError, match=rf"tp={2 * tp} does not match the world size {tp}"):
        crosschip.from_pretrained(root / "llama", backend="neuron", tp=2 * tp)


def _run(rank: int, world: int, root: Path, cases) -> None:
    for case in cases:
        if case == "errors":
            _check_errors(root, world)
        elif case == "wrong-platform":
            _check_wrong_platform_is_caught(root, world)
        else:
            _check_parity(root, *case[:1], world, *case[1:], rank=rank)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("neuron")
    _save_models(root)
    return root


def test_tp2_matches_the_reference(checkpoints):
    # (model, platform, sequence parallel, fused weight_qkv); at tp=2 only kv1 replicates, and
    # with one KV head both platforms arrange its copies alike.
    spawn(2, checkpoints, _run, [
        ("llama", "trn1", False, True), ("llama", "trn1", True, True),
        ("qwen2", "trn1", False, True), ("qwen2", "trn2", True, False),
        ("qwen3", "trn2", False, False), ("qwen3", "trn1", True, True),
        ("kv1", "trn1", False, True), ("kv1", "trn2", True, True),
        "errors"])


def test_tp4_replicating_kv_heads_matches_the_reference_on_both_platforms(checkpoints):
    cases = [(name, platform, sp, True) for name in ("llama", "qwen2", "qwen3") for platform in ("trn1", "trn2")
             for sp in (False, True)]
    spawn(4, checkpoints, _run, [*cases, ("kv1", "trn2", True, False), ("qwen2", "trn1", True, False),
                                 "wrong-platform"])
