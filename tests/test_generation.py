"""Generation: greedy tokens equal transformers' generate on the same model (with and without
left padding, on every backend that builds attention), sampling behaves as configured."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip.modeling.generation import SamplingConfig, next_token
from zoo import save_hf, zoo_configs

CONFIGS = zoo_configs()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", ["llama3.2_tied", "mistral_sliding", "qwen3_qknorm_headdim", "phi3_fused",
                                  "granite_multipliers", "olmo2_post_norms", "gemma2_softcaps",
                                  "gemma3_local_global", "smollm3_nope"])
def test_greedy_matches_transformers(tmp_path, backend, name):
    config, _ = CONFIGS[name]
    hf = save_hf(tmp_path, config)
    torch.manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    model = crosschip.from_pretrained(tmp_path, backend=backend)
    got = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (got, expected)


def test_cached_decoding_equals_full_forward(tmp_path):
    """The last-position logits of each cached step equal a full forward over the prefix."""
    from crosschip.modeling.generation import KVCache

    config, _ = CONFIGS["qwen2_sliding_layers"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    ids = torch.randint(1, config.vocab_size, (2, 14))
    cache = KVCache(model.opts.num_layers)
    model(ids[:, :6], cache=cache)
    for t in range(6, 14):
        step = model(ids[:, t:t + 1], cache=cache).logits[:, -1]
        full = model(ids[:, :t + 1]).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_eos_stops_and_pads(tmp_path):
    config, _ = CONFIGS["llama3.2_tied"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    ids = torch.randint(3, config.vocab_size, (2, 5))
    greedy = model.generate(ids, max_new_tokens=6)
    eos = int(greedy[0, 5])  # row 0's first new token
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 5] == eos and bool((out[0, 6:] == 0).all())


def test_sampling_controls():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top1 = next_token(logits, SamplingConfig(do_sample=True, top_k=1), gen)
    assert bool((top1 == 2).all())
    top2 = next_token(logits, SamplingConfig(do_sample=True, top_k=2), gen)
    assert set(top2.tolist()) == {2, 3}
    # Probabilities are 0.930, 0.046, 0.017, 0.006 for tokens 2, 3, 1, 0: top_p keeps the
    # smallest prefix of that order whose mass reaches p.
    assert set(next_token(logits, SamplingConfig(do_sample=True, top_p=0.5), gen).tolist()) == {2}
    assert set(next_token(logits, SamplingConfig(do_sample=True, top_p=0.95), gen).tolist()) == {2, 3}
    assert set(next_token(logits, SamplingConfig(do_sample=True, top_p=0.99), gen).tolist()) == {1, 2, 3}
    hot = next_token(logits, SamplingConfig(do_sample=True, temperature=100.0), gen)
    assert set(hot.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=1.5)


def test_generating_past_the_position_limit_warns_once(tmp_path):
    import warnings

    from crosschip.errors import CrosschipWarning

    config, _ = CONFIGS["mistral_sliding"]  # max_position_embeddings 128
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path)
    ids = torch.randint(3, config.vocab_size, (1, 120))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(ids, max_new_tokens=8)  # exactly at the limit: silent
        model.generate(ids, max_new_tokens=12)
    messages = [str(w.message) for w in caught if issubclass(w.category, CrosschipWarning)]
    assert messages == ["generating up to 132 positions (prompt 120 + max_new_tokens 12), past this model's "
                        "max_position_embeddings=128: the model was not trained on those positions"]
    assert caught[-1].filename == __file__  # attributed to the caller of model.generate


def test_a_model_without_a_cache_generates_through_the_protocol(tmp_path):
    """The cache protocol: a causal LM whose forward takes only ``input_ids`` (``new_cache()``
    None, the base class's default) generates by running the whole sequence each step, with the
    same greedy tokens as the decoder's cached path; left padding needs a cache, and says so."""
    from crosschip.errors import ConfigurationError
    from crosschip.checkpoint.loading import build_model, load_config
    from crosschip.models.llama import LlamaForCausalLM
    from crosschip.runtime import Runtime

    class FullSequence(LlamaForCausalLM):
        architectures = ()

        def forward(self, input_ids, labels=None):
            return super().forward(input_ids, labels=labels)

        def new_cache(self):
            return None

    from helpers import save_hf_llama

    config = save_hf_llama(tmp_path).config
    cached = crosschip.from_pretrained(tmp_path, backend="reference")
    _, loaded_config = load_config(tmp_path)
    plain = build_model(FullSequence, loaded_config, Runtime("reference", device="cpu"))
    plain.load_hf_state_dict(cached.hf_state_dict())
    plain.eval()
    prompt = torch.randint(1, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.generate(prompt, max_new_tokens=6), cached.generate(prompt, max_new_tokens=6))
    mask = torch.ones_like(prompt)
    mask[0, 0] = 0
    with pytest.raises(ConfigurationError, match="FullSequence has no cache"):
        plain.generate(prompt, max_new_tokens=2, attention_mask=mask)


def test_the_docs_tinylm_generates(tmp_path, monkeypatch):
    """docs/models.md's TinyLM, run as the page shows it (its first two code blocks), generates
    through the cache protocol: the tokens of a manual greedy loop over its forward."""
    import re
    from pathlib import Path

    import crosschip.models as models

    monkeypatch.chdir(tmp_path)  # the page saves to "tiny"
    models._load_builtin()
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # the page registers TinyLM: not for later tests
    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S)[:2]:
        exec(block, namespace)
    model = namespace["model"].eval()
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    expected = ids
    with torch.no_grad():
        for _ in range(3):
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(ids, max_new_tokens=3), expected)
