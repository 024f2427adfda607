"""The static KV cache and the compiled decode step (``generate(cache="static", compile=...)``):
the same greedy tokens as transformers' generate and as the dynamic cache (left padding, sliding
windows, eos), the same samples for one generator, one compiled graph reused across calls, and
errors that name the option."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip.errors import ConfigurationError
from crosschip.modeling.generation import generate
from crosschip.modeling.static_cache import StaticKVCache, static_length
from zoo import save_hf, zoo_configs

CONFIGS = zoo_configs()


def _padded_prompt(config, rows=3, length=7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("backend,name", [
    ("torch", "llama3.2_tied"), ("torch", "mistral_sliding"), ("torch", "gemma2_softcaps"),
    ("torch", "gemma3_local_global"), ("torch", "qwen3_qknorm_headdim"), ("torch", "gpt_neox_parallel"),
    ("reference", "qwen2_sliding_layers"), ("reference", "phi3_fused")])
def test_static_greedy_matches_transformers_and_the_dynamic_cache(tmp_path, backend, name):
    config, _ = CONFIGS[name]
    hf = save_hf(tmp_path, config)
    ids, mask = _padded_prompt(config)
    # 14 new tokens: past gemma's window of 6 and mistral's of 8, so the window hides slots.
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    model = crosschip.from_pretrained(tmp_path, backend=backend)
    static = model.generate(ids, max_new_tokens=14, attention_mask=mask, cache="static")
    dynamic = model.generate(ids, max_new_tokens=14, attention_mask=mask, cache="dynamic")
    assert torch.equal(static, expected), (static, expected)
    assert torch.equal(dynamic, expected)


def test_eos_read_back_every_few_steps_gives_the_tokens_of_every_step(tmp_path):
    """Rows finishing at different steps: generation stops (and trims) where transformers stops,
    whether the finished rows are read back every step or every 5 (steps past the last eos only
    pad, and are cut off)."""
    config, _ = CONFIGS["llama3.2_tied"]
    hf = save_hf(tmp_path, config)
    ids, mask = _padded_prompt(config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    greedy = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    prompt = ids.shape[1]
    eos = sorted({int(greedy[0, prompt + 1]), int(greedy[1, prompt + 2]), int(greedy[2, prompt + 3])})
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                           pad_token_id=0)
    assert expected.shape[1] <= prompt + 4  # stopped early: the trimming is exercised
    for cache in ("static", "dynamic"):
        for every in (1, 5):
            got = model.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                                 cache=cache)
            slow = generate(model, ids, 12, mask, eos_token_id=eos, pad_token_id=0, cache=cache, eos_check_every=every)
            assert torch.equal(got, expected), (cache, got, expected)
            assert torch.equal(slow, expected), (cache, every, slow, expected)


def test_sampling_with_one_generator_is_the_same_on_both_caches(tmp_path):
    config, _ = CONFIGS["mistral_sliding"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    ids, mask = _padded_prompt(config)
    settings = dict(max_new_tokens=14, attention_mask=mask, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    static = model.generate(ids, cache="static", generator=torch.Generator().manual_seed(7), **settings)
    dynamic = model.generate(ids, cache="dynamic", generator=torch.Generator().manual_seed(7), **settings)
    assert torch.equal(static, dynamic)
    assert not torch.equal(static, model.generate(ids, max_new_tokens=14, attention_mask=mask))  # really sampled


def test_static_cache_writes_in_place_and_steps_equal_a_full_forward(tmp_path):
    """Each cached step's last logits equal a full forward over the prefix; the cache holds
    every key at its position's slot, zeros after, in one buffer that never moves."""
    config, _ = CONFIGS["qwen2_sliding_layers"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    ids = torch.randint(1, config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(max_length=static_length(14))
    assert isinstance(cache, StaticKVCache) and cache.max_length == 128
    model(ids[:, :6], cache=cache)
    cache.advance(6)
    buffer = cache.keys[0]
    for t in range(6, 14):
        step = model(ids[:, t:t + 1], cache=cache).logits[:, -1]
        cache.advance(1)
        full = model(ids[:, :t + 1]).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert cache.keys[0] is buffer and buffer.shape[:2] == (2, 128) and int(cache.seq_len) == 14
    dynamic = model.new_cache()
    model(ids, cache=dynamic)
    torch.testing.assert_close(buffer[:, :14], dynamic.keys[0], rtol=1e-6, atol=1e-6)
    assert not buffer[:, 14:].any()


def test_cache_and_compile_options_are_checked(tmp_path):
    from crosschip.models.llama import LlamaForCausalLM

    config, _ = CONFIGS["llama3.2_tied"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    ids = torch.randint(3, config.vocab_size, (1, 4))
    with pytest.raises(ConfigurationError, match=r"generate cache='paged': expected one of dynamic, static"):
        model.generate(ids, cache="paged")
    with pytest.raises(ConfigurationError, match=r"compile=True needs cache='static' \(found cache='dynamic'\)"):
        model.generate(ids, cache="dynamic", compile=True)
    with pytest.raises(ConfigurationError, match=r"generate compile='yes': expected True, False, 'cuda-graph' or a dict"):
        model.generate(ids, compile="yes")
    with pytest.raises(ConfigurationError, match=r"compile='cuda-graph' captures the step as a CUDA graph, which needs "
                                                 r"a CUDA device \(the input is on cpu\)"):
        model.generate(ids, compile="cuda-graph")
    with pytest.raises(ConfigurationError, match=r"unknown torch.compile option\(s\) \['modes'\]"):
        model.generate(ids, compile={"modes": "max-autotune"})

    class OnlyDynamic(LlamaForCausalLM):
        architectures = ()

        def new_cache(self):
            return super().new_cache()

    model.__class__ = OnlyDynamic
    with pytest.raises(ConfigurationError, match=r"cache='static': OnlyDynamic.new_cache\(\) takes no max_length"):
        model.generate(ids, cache="static")
    assert model.generate(ids, max_new_tokens=2).shape == (1, 6)  # the dynamic cache still serves it


@pytest.mark.slow  # one inductor compile of the decode step: ~15-70 s on 2 CPU cores
def test_compiled_static_step_gives_eager_tokens_and_compiles_once(tmp_path, fresh_dynamo):
    """compile=True (on CPU: inductor, no CUDA graphs) traces the decode step as one graph
    (fullgraph: a graph break would raise) with the eager static cache's tokens; later calls of
    the same batch and length reuse it, cache buffers included."""
    from torch._dynamo.utils import counters

    config, _ = CONFIGS["mistral_sliding"]
    hf = save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    ids, mask = _padded_prompt(config)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    counters.clear()
    got = model.generate(ids, max_new_tokens=12, attention_mask=mask, compile={"fullgraph": True})
    assert torch.equal(got, expected), (got, expected)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    other = torch.randint(3, config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(9))
    again = model.generate(other, max_new_tokens=12, compile={"fullgraph": True})
    assert torch.equal(again, model.generate(other, max_new_tokens=12, cache="static"))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation


def test_cuda_graph_step_records_again_when_weights_are_replaced(tmp_path):
    """generate(compile="cuda-graph") keeps its graph while the weights stay where they were
    recorded (an optimizer step updates them in place) and drops it when a parameter is
    replaced, since the graph would read the old one's memory."""
    from crosschip.modeling.decode_step import GraphedDecode

    config, _ = CONFIGS["llama3.2_tied"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    step = GraphedDecode()
    step.cache(model, 1, 128, torch.device("cpu"))
    step._graph = recorded = object()  # what recording would have left (recording needs CUDA)
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    step.cache(model, 1, 128, torch.device("cpu"))
    assert step._graph is recorded
    module = model.get_submodule("model.norm")
    module.weight = torch.nn.Parameter(module.weight.detach().clone())
    step.cache(model, 1, 128, torch.device("cpu"))
    assert step._graph is None
