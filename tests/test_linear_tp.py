"""The general ``linear`` kind under tensor parallelism, each backend's plan honouring or refusing
``LinearSpec.parallel``. torch (gloo, two processes): a column-parallel linear feeding a
row-parallel one holds half of each weight per rank and equals one process (logits, loss, every
gradient, AdamW steps); a size tp does not split, and a linear another backend built, are refused
by name. te and neuron, the parts that run without their libraries: te maps each style to TE's
``parallel_mode`` and refuses a linear it did not build; neuron builds no general linear and its
plan refuses a sharded one built elsewhere, while a replicated one passes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

import crosschip
from crosschip import EmbeddingSpec, LinearSpec, LMHeadSpec, LossSpec, ParallelSpec, Runtime
from crosschip.errors import ConfigurationError
from crosschip.modeling import CausalLM, CausalLMOutput
from crosschip.runtime import ComponentInfo
from gloo_spawn import spawn
from helpers import assert_training_steps_match

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4, architectures=["ColumnRowLM"])


class ColumnRowLM(CausalLM):
    """Embedding, then ``x + down(gelu(up(x)))`` with ``up`` column- and ``down`` row-parallel
    general linears (Megatron's MLP pair, each half its own component), then the LM head."""

    architectures = ("ColumnRowLM",)
    config_class = LlamaConfig

    def __init__(self, config, runtime: Runtime):
        super().__init__(config, runtime)
        hidden, inner = config.hidden_size, config.intermediate_size
        self.embed = runtime.embedding(EmbeddingSpec(config.vocab_size, hidden))
        self.up = runtime.linear(LinearSpec(hidden, inner, bias=True, parallel="column"))
        # ``row_kind``: a test may take the row half as an out_projection (the same spec), so
        # another backend can build the linear while torch still owns the plan.
        row_kind = getattr(config, "row_kind", "linear")
        self.down = runtime.component(row_kind, LinearSpec(inner, hidden, bias=True, parallel="row"))
        self.lm_head = runtime.lm_head(LMHeadSpec(hidden, config.vocab_size))
        self.loss_fn = runtime.loss(LossSpec(config.vocab_size))

    def forward(self, input_ids, labels=None):
        x = self.embed(input_ids)
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        logits = self.lm_head(x)
        loss = self.loss_fn(x, labels, self.lm_head, logits) if labels is not None else None
        return CausalLMOutput(logits, loss)

    def checkpoint_names(self):
        return {"embed": {"": "model.embed_tokens"}, "up": {"": "model.up"}, "down": {"": "model.down"}}


def _register(monkeypatch=None) -> None:
    import crosschip.models as models

    models._load_builtin()
    if monkeypatch is not None:  # ColumnRowLM is not for later tests of this process
        monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    models.register_model(ColumnRowLM)


def _build(tp: int, **config):
    from crosschip.checkpoint.loading import build_model

    runtime = Runtime("torch", device="cpu", parallel=ParallelSpec(tp=tp),
                      components={"linear": config.pop("linear_backend", "torch")})
    return build_model(ColumnRowLM, LlamaConfig(**{**CONFIG, **config}), runtime)


def _rank(rank: int, world: int, root: Path) -> None:
    from torch.distributed.tensor import DTensor

    _register()
    single = crosschip.from_pretrained(root / "model", backend="torch").train()
    model = crosschip.from_pretrained(root / "model", backend="torch", tp=2).train()
    # Each style shards its own dim: equality with one process alone would also hold replicated.
    up, down = model.up.weight, model.down.weight
    assert isinstance(up, DTensor) and up.to_local().shape == (24, 32), up
    assert isinstance(down, DTensor) and down.to_local().shape == (32, 24), down
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert_training_steps_match(model, single, ids, 1e-5, "column then row linear, tp=2")

    with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the output features of the "
                                                 r"column-parallel projection \(45\)"):
        _build(2, intermediate_size=45)
    with pytest.raises(ConfigurationError, match="tp=2: linear at up was built by backend 'reference'; the torch "
                                                 "backend's parallel plan shards only its own modules"):
        _build(2, linear_backend="reference", row_kind="out_projection")


def test_column_then_row_linear_at_tp2_equals_one_process(tmp_path, monkeypatch):
    from crosschip.weights.init import init_weights

    _register(monkeypatch)
    model = _build(1)
    init_weights(model, seed=0)
    model.save_pretrained(tmp_path / "model")
    spawn(2, tmp_path, _rank)


def test_an_unknown_parallel_style_is_refused_by_name():
    with pytest.raises(ValueError, match="LinearSpec.parallel must be column, row or replicated, found 'diagonal'"):
        LinearSpec(32, 48, parallel="diagonal")


def _module(component: str, backend: str, spec) -> nn.Module:
    module = nn.Linear(spec.in_features, spec.out_features)
    module.crosschip_component = ComponentInfo(component, backend, spec)
    return module


def test_te_maps_each_style_to_its_parallel_mode_and_refuses_foreign_linears(monkeypatch):
    from crosschip_te import parallel

    for style in ("column", "row"):
        assert parallel.linear_mode(LinearSpec(8, 8, parallel=style), 2) == style
        assert parallel.linear_mode(LinearSpec(8, 8, parallel=style), 1) is None
    assert parallel.linear_mode(LinearSpec(8, 8), 2) is None
    # The refusal comes before any TE module or process group is touched.
    monkeypatch.setattr(parallel, "check_process_group", lambda runtime: None)
    model = nn.Module()
    model.up = _module("linear", "torch", LinearSpec(32, 48, parallel="column"))
    runtime = SimpleNamespace(parallel=ParallelSpec(tp=2), device=torch.device("cpu"))
    with pytest.raises(ConfigurationError, match="tp=2: linear at up was built by backend 'torch'; under the te "
                                                 "backend's tensor parallelism the projections must all be te's"):
        parallel.parallelize(model, runtime)


def test_neuron_builds_no_general_linear_and_its_plan_refuses_sharded_foreign_ones():
    from crosschip.plugins.registry import get_registry
    from crosschip_neuron import support
    from crosschip_neuron.parallel import _check_split

    registry = get_registry()
    assert ("neuron", "linear") not in registry.components
    ctx = SimpleNamespace(parallel=ParallelSpec(tp=2))
    assert "not parallel='column'" in support.out_projection(LinearSpec(32, 48, parallel="column"), ctx)
    runtime = SimpleNamespace(registry=registry)
    for style in ("column", "row"):
        info = ComponentInfo("linear", "reference", LinearSpec(32, 48, parallel=style))
        with pytest.raises(ConfigurationError, match="tp=2: linear at up was built by backend 'reference'; "
                                                     "under the neuron backend's tensor parallelism"):
            _check_split("up", info, runtime, 2, False)
    # Replicated: whole on every rank, nothing for NxD to shard.
    _check_split("up", ComponentInfo("linear", "reference", LinearSpec(32, 48)), runtime, 2, False)
