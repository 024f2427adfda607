"""The torch backend under ``torch.compile`` (default inductor) on CPU: a tiny Llama compiles, its
logits match eager within 1e-5 relative and a backward pass gives the eager gradients."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_rel_close, save_hf_llama

pytestmark = pytest.mark.slow  # two inductor compiles (train fwd+bwd, inference): ~50 s on 2 cores

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _run(call, model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = call(ids, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def test_torch_backend_compiles_with_inductor(tmp_path, fresh_dynamo):
    from torch._dynamo.utils import counters

    import crosschip

    save_hf_llama(tmp_path, **TINY)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    chosen = {d.component: d.backend for d in model.runtime.report.decisions}
    assert chosen["qkv_projection"] == chosen["gated_mlp"] == chosen["attention"] == "torch", chosen

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    eager_logits, eager_loss, eager_grads = _run(model, model, ids, labels)

    counters.clear()
    compiled = torch.compile(model)  # default backend: inductor (C++ codegen on CPU)
    logits, loss, grads = _run(compiled, model, ids, labels)

    # It really compiled, as one graph: dynamo captured it whole, AOTAutograd split it into a
    # forward and a backward graph and inductor produced code for both (freshly or from its cache).
    # A silent fall back to eager would make the comparisons below vacuous.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["aot_autograd"]["ok"] == 1, dict(counters["aot_autograd"])
    assert counters["inductor"], "inductor never ran"  # fxgraph cache hits/misses, extern calls...

    assert_rel_close(logits, eager_logits, 1e-5, "compiled logits")
    assert_rel_close(loss, eager_loss, 1e-5, "compiled loss")
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert_rel_close(grad, eager_grads[name], 1e-5, f"compiled grad of {name}")
    assert any(g.abs().sum() > 0 for g in grads.values())

    # Inference (no autograd): another graph, same logits.
    with torch.no_grad():
        assert_rel_close(compiled(ids).logits, model(ids).logits, 1e-5, "compiled inference logits")
    assert not counters["graph_break"], dict(counters["graph_break"])

    # The compiled module shares its parameters: weights map back to the Hugging Face layout.
    assert set(model.hf_grads()) == set(model.hf_state_dict())


def test_compile_is_a_runtime_option_and_a_train_flag(tmp_path, fresh_dynamo):
    """``from_pretrained(compile=True)`` compiles the model in place (the same object, graphs
    really produced) with eager's numbers, and ``crosschip train --compile`` trains to eager's
    losses; unknown options are refused by name."""
    from torch._dynamo.utils import counters

    import crosschip
    from crosschip.errors import ConfigurationError
    from crosschip.training.train import TrainArgs, train

    save_hf_llama(tmp_path / "base", **{**TINY, "vocab_size": 258})
    eager = crosschip.from_pretrained(tmp_path / "base", backend="torch")
    counters.clear()
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch", compile={"dynamic": False})
    assert isinstance(model, crosschip.CausalLM) and model.compiled == {"dynamic": False}
    ids = torch.randint(0, 258, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(model(ids).logits, eager(ids).logits, 1e-5, "compiled logits")
    assert counters["stats"]["unique_graphs"] >= 1 and counters["inductor"], dict(counters["stats"])
    with pytest.raises(ConfigurationError, match=r"unknown torch.compile option\(s\) \['modes'\]"):
        crosschip.from_pretrained(tmp_path / "base", backend="torch", compile={"modes": "max-autotune"})

    common = dict(model=str(tmp_path / "base"), backend="torch", steps=3, batch_size=2, seq_len=16, seed=1)
    plain = train(TrainArgs(out=str(tmp_path / "eager"), **common), progress=False).losses
    compiled = train(TrainArgs(out=str(tmp_path / "compiled"), compile=True, **common), progress=False).losses
    assert len(compiled) == len(plain) == 3
    for got, expected in zip(compiled, plain):
        assert abs(got - expected) <= 1e-5 * abs(expected), (compiled, plain)
