"""``compile="cuda-graph"`` for training (crosschip.modeling.layer_graphs): what is refused, and
the replay path's plumbing on the CPU. Recording needs CUDA; on the CPU the recorder is replaced by
one that returns the layer calls as they are, so these tests check what feeds the graphs (one call
per layer, each with its own rotary tables, shapes keyed, weights watched), and
tests/test_layer_graphs_cuda.py checks the real graphs against eager steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import MixtralConfig

import crosschip
from crosschip.errors import ConfigurationError
from crosschip.modeling.layer_graphs import LayerGraphs
from crosschip.training.train_args import TrainArgs
from helpers import save_hf_llama
from zoo import save_hf, zoo_configs


def test_refused_where_no_backend_records_layers(tmp_path):
    save_hf_llama(tmp_path)
    with pytest.raises(ConfigurationError, match=r"none of this model's backends \(reference, torch\) records layers.*"
                                                 r"reduce-overhead"):
        crosschip.from_pretrained(tmp_path, backend="torch", compile="cuda-graph")


def test_refused_with_activation_checkpointing(tmp_path):
    save_hf_llama(tmp_path)
    with pytest.raises(ConfigurationError, match=r"activation_checkpointing='full', expected 'none'"):
        crosschip.from_pretrained(tmp_path, backend="torch", compile="cuda-graph", activation_checkpointing="full")


def test_refused_for_a_mixture_of_experts(tmp_path):
    save_hf(tmp_path, MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2))
    with pytest.raises(ConfigurationError, match="mixture of experts"):
        crosschip.from_pretrained(tmp_path, backend="torch", compile="cuda-graph")


def test_refused_for_a_model_without_decoder_layers(tmp_path):
    config, _ = zoo_configs()["gpt_neox_parallel"]
    save_hf(tmp_path, config)
    with pytest.raises(ConfigurationError, match="GPTNeoXForCausalLM has none"):
        crosschip.from_pretrained(tmp_path, compile="cuda-graph")


def test_train_flag_takes_cuda_graph():
    assert TrainArgs(compile="cuda-graph").compile_option() == "cuda-graph"
    with pytest.raises(ConfigurationError, match="--compile 'graphs'.*cuda-graph"):
        TrainArgs(compile="graphs").compile_option()


def _as_recorded(model) -> list[dict]:
    """Gives ``model`` layer graphs whose recorder keeps the calls eager (recording needs CUDA);
    returns the list each recording appends what it was given to (calls, samples, grads_consumed)."""
    recorded = []

    def record(calls, samples, grads_consumed):
        recorded.append(dict(calls=calls, samples=samples, grads_consumed=grads_consumed))
        return calls

    model.runtime.graph_function = lambda: record
    model.layer_graphs = LayerGraphs()
    return recorded


@pytest.mark.parametrize("name", ["gemma3_local_global", "smollm3_nope", "phi3_longrope_partial"])
def test_replay_path_computes_the_eager_step(tmp_path, name):
    """Layers run through their graph calls (each layer with its own rotary's tables: Gemma 3's
    local and global, SmolLM3's RoPE-less layer) give the eager loss and every gradient."""
    config, _ = zoo_configs()[name]
    save_hf(tmp_path, config)
    eager = crosschip.from_pretrained(tmp_path, backend="torch").train()
    graphed = crosschip.from_pretrained(tmp_path, backend="torch").train()
    recorded = _as_recorded(graphed)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (eager, graphed):
        model(ids, labels=ids).loss.backward()
    assert graphed.layer_graphs.recordings == 1 and recorded[0]["samples"][0][0].shape == (2, 12, config.hidden_size)
    assert torch.equal(graphed(ids, labels=ids).loss, eager(ids, labels=ids).loss)
    for (key, a), (_, b) in zip(graphed.named_parameters(), eager.named_parameters()):
        assert torch.equal(a.grad, b.grad), key


def test_other_forwards_run_eagerly_and_replaced_weights_record_again(tmp_path):
    save_hf_llama(tmp_path)
    model = crosschip.from_pretrained(tmp_path, backend="torch").train()
    _as_recorded(model)
    graphs = model.layer_graphs
    ids = torch.randint(0, 128, (2, 12))
    assert graphs.prepare(model, ids, torch.arange(12)[None], _plain(), None)
    with pytest.warns(UserWarning, match=r"shape \(2, 8\) is not the recorded \(2, 12\)"):
        assert not graphs.prepare(model, ids[:, :8], torch.arange(8)[None], _plain(), None)
    with pytest.warns(UserWarning, match="padding"):
        model(ids, attention_mask=torch.ones_like(ids), labels=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evaluation is eager by design: no warning
        model.eval()
        with torch.no_grad():
            model(ids)
        model.train()
    assert graphs.recordings == 1
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().clone())
    assert graphs.prepare(model, ids, torch.arange(12)[None], _plain(), None)
    assert graphs.recordings == 2


def _plain():
    from crosschip.modeling.masks import AttentionMask

    return AttentionMask()


def test_recorded_again_when_the_optimizer_starts_or_stops_stepping_in_backward(tmp_path):
    """The graphs may hand out their own gradient buffers only while every gradient is consumed
    at once (the optimizer in the backward); a change either way records again."""
    from crosschip.training.in_backward import step_in_backward

    save_hf_llama(tmp_path)
    model = crosschip.from_pretrained(tmp_path, backend="torch").train()
    recorded = _as_recorded(model)
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids)
    handle = step_in_backward(torch.optim.AdamW(model.parameters()))
    model(ids, labels=ids)
    model(ids, labels=ids)
    handle.remove()
    model(ids, labels=ids)
    assert [r["grads_consumed"] for r in recorded] == [False, True, False]


def test_a_frozen_base_with_adapters_asks_gradients_of_every_layer_after_the_first(tmp_path):
    """Adapters train and the embedding does not: the first layer's input needs no gradient, every
    later one's does (or the adapters of the layers before it would get none); the step still
    gives the eager gradients of every adapter."""
    save_hf_llama(tmp_path, num_hidden_layers=3)
    lora = crosschip.LoraConfig(r=4, init="gaussian")
    eager = crosschip.from_pretrained(tmp_path, backend="torch", lora=lora).train()
    graphed = crosschip.from_pretrained(tmp_path, backend="torch", lora=lora).train()
    graphed.load_state_dict(eager.state_dict())
    recorded = _as_recorded(graphed)
    ids = torch.randint(0, 128, (2, 12))
    for model in (eager, graphed):
        model(ids, labels=ids).loss.backward()
    assert [sample[0].requires_grad for sample in recorded[0]["samples"]] == [False, True, True]
    # Each layer's graph takes its own adapter slots as parameters (they are the model's
    # children, not the layer's), so the graph computes their gradients.
    for index, call in enumerate(recorded[0]["calls"]):
        own = {p for key, p in graphed.named_parameters() if p.requires_grad and f"model__layers__{index}__" in key}
        assert own and {p for p in call.parameters() if p.requires_grad} == own, index
    trained = [(key, p) for key, p in graphed.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)
    eager_grads = dict(eager.named_parameters())
    for key, p in trained:
        assert torch.equal(p.grad, eager_grads[key].grad), key
    graphed.model.layers[0].self_attn.qkv_proj.weight.requires_grad_(True)  # which ones train changed
    graphed(ids, labels=ids)
    assert len(recorded) == 2
