"""Compiled generation on CUDA (marked ``cuda``): the decode step over the static cache,
compiled with ``mode="reduce-overhead"`` and replayed as CUDA graphs (none skipped), gives the
greedy tokens of the eager static and dynamic caches in bf16."""

from __future__ import annotations

import pytest
import torch

import crosschip
from zoo import save_hf, zoo_configs

pytestmark = pytest.mark.cuda
CONFIGS = zoo_configs()


@pytest.mark.parametrize("backend", ["torch", "te"])
def test_compiled_static_generation_gives_eager_tokens_in_bf16(tmp_path, backend, fresh_dynamo):
    from torch._dynamo.utils import counters

    if backend == "te":
        pytest.importorskip("transformer_engine", reason="the te backend needs Transformer Engine")
    config, _ = CONFIGS["llama3.2_tied"]
    config.initializer_range = 0.5  # logits far apart: bf16 rounding cannot flip a greedy choice
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend=backend, device="cuda", dtype="bf16")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (3, 9), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    dynamic = model.generate(ids, max_new_tokens=20, attention_mask=mask, cache="dynamic")
    static = model.generate(ids, max_new_tokens=20, attention_mask=mask, cache="static")
    counters.clear()
    compiled = [model.generate(ids, max_new_tokens=20, attention_mask=mask, compile=True) for _ in range(3)]
    assert torch.equal(static, dynamic)
    for tokens in compiled:  # the first call records, the later ones replay
        assert torch.equal(tokens, static), (tokens, static)
    # A graph was really recorded (its per-step inputs counted), and none was skipped (a cache
    # buffer mutated without a static address would be).
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("backend", ["torch", "te"])
def test_cuda_graph_generation_gives_eager_tokens_and_replays_one_graph(tmp_path, backend, monkeypatch):
    """compile="cuda-graph": the eager step recorded once per cache and replayed, no torch.compile."""
    if backend == "te":
        pytest.importorskip("transformer_engine", reason="the te backend needs Transformer Engine")
    config, _ = CONFIGS["llama3.2_tied"]
    config.initializer_range = 0.5
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend=backend, device="cuda", dtype="bf16")
    ids = torch.randint(3, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    static = model.generate(ids, max_new_tokens=20, attention_mask=mask, cache="static")
    recorded, replays = [], []
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", _counting(torch.cuda.CUDAGraph.replay, replays))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", _counting(torch.cuda.CUDAGraph.capture_end, recorded))
    monkeypatch.setattr(torch, "compile", _refused)
    graphed = [model.generate(ids, max_new_tokens=20, attention_mask=mask, compile="cuda-graph") for _ in range(3)]
    for tokens in graphed:  # the first call records, the later ones replay the same graph
        assert torch.equal(tokens, static), (tokens, static)
    assert len(recorded) == 1 and len(replays) == 3 * 19  # every step after the prompt, one replay each
    other = model.generate(ids[:2], max_new_tokens=5, attention_mask=mask[:2], compile="cuda-graph")
    assert torch.equal(other, model.generate(ids[:2], max_new_tokens=5, attention_mask=mask[:2], cache="static"))
    assert len(recorded) == 2  # another batch: another cache, recorded anew


def _counting(method, calls):
    def counted(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    return counted


def _refused(*args, **kwargs):
    raise AssertionError("compile='cuda-graph' must not call torch.compile")
