"""``compile=True`` compiles each decoder block (one graph shared by every layer) and the loss, so
it composes with data, tensor and sequence parallelism: on gloo, a compiled tp=2 x dp=2 model with
sequence parallelism equals the eager single-process model (logits, loss, every gradient, three
AdamW steps). Compiling the model as one graph fails there (the vocabulary-parallel embedding's
``_MaskPartial`` does not trace). A mixture-of-experts model compiles too, in float32 and
bfloat16."""

from __future__ import annotations

import pytest
import torch

import crosschip
from gloo_spawn import spawn
from helpers import assert_rel_close, save_hf_llama

pytestmark = pytest.mark.slow  # inductor compiles in every rank: ~30 s on 2 cores

TOL = 1e-5


def test_blocks_share_one_graph(tmp_path, fresh_dynamo):
    """Six layers compile as one block graph (its four projections) plus the loss's (the LM
    head): one compilation serves every layer, where compiling the model whole would trace all
    six layers into one graph of 25 projections. Gradients equal eager's."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(sum("linear" in str(node.target) for node in gm.graph.nodes))
        return lookup_backend("inductor")(gm, example_inputs)

    save_hf_llama(tmp_path, num_hidden_layers=6)
    eager = crosschip.from_pretrained(tmp_path, backend="torch").train()
    model = crosschip.from_pretrained(tmp_path, backend="torch", compile={"backend": recording_inductor}).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        expected, got = eager(ids, labels=ids, return_logits=False), model(ids, labels=ids, return_logits=False)
        expected.loss.backward()
        got.loss.backward()
        assert_rel_close(got.loss, expected.loss, TOL, "compiled loss")
    assert sorted(graphs) == [1, 4], graphs
    for name, param in model.named_parameters():
        assert_rel_close(param.grad, dict(eager.named_parameters())[name].grad, TOL, f"grad of {name}")


def test_compiled_tp2_dp2_sequence_parallel_matches_single_process(tmp_path):
    """test_data_parallel's parity check (logits, loss, every gradient, 3 AdamW steps, the saved
    checkpoint) on a compiled model."""
    from test_data_parallel import _run

    save_hf_llama(tmp_path / "llama")
    spawn(4, tmp_path, _run, [("llama", 2, 2, True, True)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_mixture_of_experts(tmp_path, fresh_dynamo, dtype):
    """A Qwen3-MoE model compiles per block and equals eager (loss, auxiliary loss, every
    gradient). bfloat16 takes the grouped GEMM, whose routing has no host sync, so it traces
    without a graph break; float32 takes the loop over experts (torch's traced grouped GEMM
    accepts bfloat16 only), which reads the group sizes on the host and so breaks the graph."""
    from torch._dynamo.utils import counters

    from test_expert_parallel import _config
    from zoo import save_hf

    save_hf(tmp_path, _config(output_router_logits=True))
    eager = crosschip.from_pretrained(tmp_path, backend="torch", dtype=dtype).train()
    model = crosschip.from_pretrained(tmp_path, backend="torch", dtype=dtype, compile=True).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    tol = TOL if dtype == torch.float32 else 2e-2
    counters.clear()
    for _ in range(2):
        expected, got = eager(ids, labels=ids), model(ids, labels=ids)
        expected.loss.backward()
        got.loss.backward()
        assert_rel_close(got.loss, expected.loss, tol, "compiled loss")
        assert_rel_close(got.aux_loss, expected.aux_loss, tol, "compiled auxiliary loss")
    for name, param in model.named_parameters():
        assert_rel_close(param.grad, dict(eager.named_parameters())[name].grad, tol, f"grad of {name}")
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert bool(counters["graph_break"]) == (dtype == torch.float32), dict(counters["graph_break"])


def test_a_model_compiled_for_training_generates_without_compiling(tmp_path, fresh_dynamo):
    """generate() on a from_pretrained(compile=True) model runs its uncompiled steps eagerly (their
    shapes change every token: the compiled blocks would recompile per length and per layer);
    generate(cache="static", compile=True) still compiles its own step, once. Tokens equal eager's."""
    from torch._dynamo.utils import counters

    save_hf_llama(tmp_path, num_hidden_layers=2)
    eager = crosschip.from_pretrained(tmp_path, backend="torch")
    model = crosschip.from_pretrained(tmp_path, backend="torch", compile=True)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = eager.generate(ids, max_new_tokens=6)
    for options, graphs in ((dict(), 0), (dict(cache="static"), 0), (dict(cache="static", compile=True), 1)):
        counters.clear()
        assert torch.equal(model.generate(ids, max_new_tokens=6, **options), expected), options
        assert counters["stats"].get("unique_graphs", 0) == graphs, (options, dict(counters["stats"]))


@pytest.mark.parametrize("argv, option", [([], False), (["--compile"], True),
                                          (["--compile", "reduce-overhead"], {"mode": "reduce-overhead"})])
def test_train_compile_flag_reaches_compile_model(tmp_path, monkeypatch, argv, option):
    """`crosschip train --compile [MODE]` is what from_pretrained(compile=...) takes."""
    from crosschip.cli import main
    from crosschip.training import train as training

    seen = []
    monkeypatch.setattr(training, "compile_model", lambda model, given: seen.append(given))
    assert main(["train", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet", "--device", "cpu",
                 "--out", str(tmp_path / "o"), *argv]) == 0
    assert seen == [option]
