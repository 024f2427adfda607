"""Compiled generation on CUDA (marked ``cuda``): the decode step over the static cache,
compiled with ``mode="reduce-overhead"`` and replayed as CUDA graphs (none skipped), gives the
greedy tokens of the eager static and dynamic caches in bf16, up to a near-tie (inductor's fused
bf16 kernels round differently from eager's: on one H100 a row flipped at its fifth new token,
between two logits within bf16 rounding, in every compile mode alike). The eager step recorded
as a CUDA graph runs eager's kernels and gives its tokens exactly."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip.modeling.generation import positions_from_mask
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
        assert_same_or_near_tie(model, tokens, static, mask)
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
    if backend != "torch":  # replacing te's parameters is not what this checks
        return
    with torch.no_grad():  # weights replaced (not updated in place): the graph is recorded anew
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(param.detach().clone() * 2, requires_grad=False))
    again = model.generate(ids[:2], max_new_tokens=5, attention_mask=mask[:2], compile="cuda-graph")
    assert len(recorded) == 3
    assert torch.equal(again, model.generate(ids[:2], max_new_tokens=5, attention_mask=mask[:2], cache="static"))


def assert_same_or_near_tie(model, got, expected, mask, tolerance=0.02):
    """``got`` equals ``expected`` (eager greedy tokens) or first differs, in each row, where
    eager's two best next-token logits are within ``tolerance`` of its largest logit's magnitude
    and ``got`` picked the other of the two: a rounding flip, not a wrong step."""
    prompt = mask.shape[1]
    for row in range(got.shape[0]):
        differ = (got[row] != expected[row]).nonzero()
        if len(differ) == 0:
            continue
        at = int(differ[0])
        assert at >= prompt, (row, at)
        full = torch.cat([mask[row:row + 1], torch.ones(1, at - prompt, dtype=mask.dtype, device=mask.device)], dim=1)
        logits = model(expected[row:row + 1, :at], attention_mask=full, position_ids=positions_from_mask(full)).logits
        best = logits[0, -1].float().topk(2)
        margin = float(best.values[0] - best.values[1])
        assert margin <= tolerance * float(best.values.abs().max()), (row, at, margin, best)
        assert int(got[row, at]) in best.indices.tolist(), (row, at, best)


def _counting(method, calls):
    def counted(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    return counted


def _refused(*args, **kwargs):
    raise AssertionError("compile='cuda-graph' must not call torch.compile")
