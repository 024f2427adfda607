"""The model author kit (crosschip.testing.parity): it passes for families that match
transformers, once with tp=2, and it fails, naming what differs, for model classes broken in
one way each: a wrong norm epsilon (logits), a frozen weight (one gradient key), a checkpoint
transform that scales a weight on save (save), a KV cache that swaps keys and values (generation), a
failure on the tensor-parallel ranks only (tp). Also: docs/model-authors.md's example model file
and its tests run as the page shows them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig

from crosschip.errors import ConfigurationError
from crosschip.modeling.generation import KVCache
from crosschip.weights.layouts import Transform
from crosschip.models import model_class
from crosschip.models.llama import LlamaForCausalLM
from crosschip.testing import ParityError, parity
from zoo import BASE, zoo_configs

LLAMA = LlamaConfig(**BASE, attention_bias=True)  # biases too: a dropped one would show


# -- broken model classes (module level: the tp check pickles the class into its ranks) -------
class WrongNormEps(LlamaForCausalLM):
    @classmethod
    def options(cls, config):
        return dataclasses.replace(super().options(config), norm_eps=1e-2)


class DropsAttentionBias(LlamaForCausalLM):
    @classmethod
    def options(cls, config):
        return dataclasses.replace(super().options(config), qkv_bias=False)


class FrozenFinalNorm(LlamaForCausalLM):
    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        self.model.norm.weight.requires_grad_(False)


class _DoubledOnSave(Transform):
    """Loads ``down.weight`` as stored but writes it doubled: two directions that disagree."""

    def apply(self, tensors):
        return {k: v * 2 if k == "down.weight" else v for k, v in tensors.items()}

    def invert(self, tensors):
        return dict(tensors)


class SavesDoubledDown(LlamaForCausalLM):
    def checkpoint_transform(self, path, info):
        if path == "model.layers.1.mlp":
            return _DoubledOnSave()
        return super().checkpoint_transform(path, info)


class _CacheSwapsKV(KVCache):
    def update(self, layer, k, v):
        k, v = super().update(layer, k, v)
        self.keys[layer], self.values[layer] = v, k  # the typo: the next step attends to values
        return k, v


class SwapsCachedKV(LlamaForCausalLM):
    def new_cache(self):
        return _CacheSwapsKV(self.opts.num_layers)


class ForwardFails(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        raise RuntimeError("forward broke")


class FailsUnderTP(LlamaForCausalLM):
    def __init__(self, config, runtime):
        if runtime.parallel.tp > 1:
            raise ValueError("this model refuses tensor parallelism")
        super().__init__(config, runtime)


# -- passing ----------------------------------------------------------------------------------
def test_llama_passes_every_check_with_tp2(tmp_path):
    report = parity.check_model(LLAMA, tmp_path, tp=2)
    assert report.passed and report.checks == ["logits", "grads", "save", "generate", "tp"]
    assert {(r.check, r.backend) for r in report.results} >= {("logits", "torch"), ("grads", "reference"),
                                                             ("tp", "torch tp=2")}
    for check in ("logits", "grads", "tp"):
        assert report.max_error(check) is not None and report.max_error(check) <= 1e-5
    assert "tp [torch tp=2]: passed" in str(report) and "9 passed, 0 failed" in str(report)


def test_qwen3_passes(tmp_path):
    config, _ = zoo_configs()["qwen3_qknorm_headdim"]
    report = parity.check_model(config, tmp_path)
    assert report.passed and report.architecture == "Qwen3ForCausalLM"
    assert len(report.results) == 8  # four checks on two backends


def test_bfloat16_is_held_to_its_tolerance(tmp_path):
    """The model really runs in bfloat16 (its rounding shows) and is held to bfloat16's bound,
    transformers computing in float32 on the same rounded weights; the save is still exact."""
    import torch

    config, _ = zoo_configs()["qwen3_qknorm_headdim"]
    report = parity.check_model(config, tmp_path, dtype=torch.bfloat16, backends=("torch",),
                                checks=("logits", "save"))
    assert report.tolerance == 3e-2 and 1e-4 < report.max_error("logits") <= 3e-2


def test_an_unregistered_class_is_checked_and_left_unregistered(tmp_path):
    class MyLlama(LlamaForCausalLM):
        pass

    report = parity.check_model(LLAMA, tmp_path, model_class=MyLlama, backends=("torch",),
                                checks=("logits",))
    assert report.passed and report.model_class == "MyLlama"
    assert model_class("LlamaForCausalLM") is LlamaForCausalLM


def test_unknown_check_is_an_error(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown check 'logit'.*logits, grads, save, generate, tp"):
        parity.check_model(LLAMA, tmp_path, checks=("logit",))


# -- failing: one break per check kind ----------------------------------------------------------
def _failure(tmp_path, cls, **kwargs) -> str:
    with pytest.raises(ParityError) as info:
        parity.check_model(LLAMA, tmp_path, model_class=cls, **kwargs)
    assert isinstance(info.value, AssertionError) and info.value.report.failed
    assert str(info.value) == str(info.value.report)
    return str(info.value)


def test_a_wrong_norm_fails_logits_and_loss(tmp_path):
    message = _failure(tmp_path, WrongNormEps, checks=("logits",))
    assert "parity of WrongNormEps with transformers' LlamaForCausalLM" in message
    for backend in ("reference", "torch"):
        assert f"logits [{backend}]: FAILED" in message
    assert re.search(r"    logits: relative error [0-9.e-]+ > 1e-05", message)
    assert re.search(r"    loss: relative error [0-9.e-]+ > 1e-05", message)


def test_a_dropped_bias_fails_the_load_naming_the_keys(tmp_path):
    message = _failure(tmp_path, DropsAttentionBias, checks=("logits", "save"))
    assert "0 passed, 2 failed" in message  # one line per backend: nothing else can run
    assert "load [reference]: FAILED" in message and "load [torch]: FAILED" in message
    assert "model.layers.0.self_attn.q_proj.bias" in message


def test_a_frozen_weight_fails_that_gradient_only(tmp_path):
    message = _failure(tmp_path, FrozenFinalNorm, backends=("torch",), checks=("logits", "grads"))
    assert "logits [torch]: passed" in message and "grads [torch]: FAILED" in message
    problems = [line.strip() for line in message.splitlines() if line.startswith("    ")]
    assert problems == ["model.norm.weight: no gradient (transformers has one of shape (64,))"]


def test_a_save_that_changes_a_weight_fails_save(tmp_path):
    message = _failure(tmp_path, SavesDoubledDown, backends=("reference",), checks=("logits", "save"))
    assert "logits [reference]: passed" in message and "save [reference]: FAILED" in message
    assert re.search(r"model\.layers\.1\.mlp\.down_proj\.weight: saved tensor differs \(max abs difference", message)
    assert "layers.0" not in message


def test_a_cache_bug_fails_generation_only(tmp_path):
    message = _failure(tmp_path, SwapsCachedKV, backends=("reference",), checks=("logits", "generate"))
    assert "logits [reference]: passed" in message and "generate [reference]: FAILED" in message
    assert re.search(r"row \d: new token [1-9]\d* is \d+, transformers \d+", message)


def test_a_failing_rank_fails_tp_with_its_traceback(tmp_path):
    message = _failure(tmp_path, FailsUnderTP, backends=("torch",), checks=("logits", "tp"), tp=2,
                       tp_timeout_s=120)
    assert "logits [torch]: passed" in message and "tp [torch tp=2]: FAILED" in message
    assert "rank " in message and "Traceback" in message
    assert "ValueError: this model refuses tensor parallelism" in message


def test_a_failing_forward_is_reported_and_the_other_checks_run(tmp_path):
    message = _failure(tmp_path, ForwardFails, backends=("reference",), checks=("logits", "grads", "save"))
    assert "logits [reference]: FAILED\n      RuntimeError: forward broke" in message
    assert "grads [reference]: FAILED" in message and "save [reference]: passed" in message


def test_ranks_past_the_timeout_are_stopped(tmp_path):
    message = _failure(tmp_path, None, backends=(), checks=("tp",), tp=2, tp_timeout_s=0.5)
    assert "tp [torch tp=2]: FAILED" in message and "ranks still running after 0.5 s; stopped" in message


# -- the docs page, as written ------------------------------------------------------------------
ROOT = Path(__file__).parents[1]


def test_the_model_authors_page_runs(tmp_path, monkeypatch):
    """docs/model-authors.md's code blocks are the example files, included whole (snippets);
    the two model files register their families and their tests (the kit, once at tp=2) pass."""
    import importlib

    import crosschip.models as models

    text = (ROOT / "docs" / "model-authors.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    included = [re.fullmatch(r'--8<-- "(examples/model_author_\w+\.py)"\n', block) for block in blocks]
    assert blocks and all(included), "every python block of the page includes an example file"
    assert [m.group(1) for m in included] == ["examples/model_author_ministral.py",
                                              "examples/model_author_starcoder2.py",
                                              "examples/model_author_test.py"]

    models._load_builtin()
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # the page registers a family
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    for module, name in (("model_author_ministral", "MinistralForCausalLM"),
                         ("model_author_starcoder2", "Starcoder2ForCausalLM")):
        family = importlib.import_module(module)
        assert models.model_class(name) is getattr(family, name)
    tests = importlib.import_module("model_author_test")
    names = [n for n in vars(tests) if n.startswith("test_")]
    assert names == ["test_ministral_matches_transformers", "test_starcoder2_matches_transformers_also_at_tp2"]
    for name in names:
        getattr(tests, name)(tmp_path / name)
