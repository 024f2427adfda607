"""Qwen3-MoE and Mixtral against transformers in float32 on the CPU backends: logits, the loss
with the routers' auxiliary loss (the configs ask transformers to add it), the auxiliary loss
itself, every gradient, the checkpoint transformers loads, and greedy generation.

The random weights and inputs below have no ties in the top-k routing (a tie would let either
implementation pick either expert); the routing test in test_moe_kind.py covers degenerate
routing (every token to one expert, idle experts)."""

from __future__ import annotations

import re

import pytest
import torch

import crosschip
from helpers import assert_rel_close
from zoo import save_hf

TOL = 1e-5


def _configs():
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, output_router_logits=True, tie_word_embeddings=False)
    return {
        "qwen3_moe": (Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                                     num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                     mlp_only_layers=[1], router_aux_loss_coef=0.02, head_dim=16),
                      "mlp", ("gate_proj", "up_proj", "down_proj")),
        "mixtral": (MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                  router_aux_loss_coef=0.05, sliding_window=6),
                    "block_sparse_moe", ("w1", "w3", "w2")),
        # OLMoE: q/k norms over the whole projection, top-k weights not renormalised.
        "olmoe": (OlmoeConfig(**common, intermediate_size=32, num_experts=5, num_experts_per_tok=3,
                              norm_topk_prob=False, router_aux_loss_coef=0.01),
                  "mlp", ("gate_proj", "up_proj", "down_proj")),
    }


CONFIGS = _configs()


def _transformers_grads(hf, block: str, roles) -> dict[str, torch.Tensor]:
    """transformers keeps each layer's experts stacked in memory (``mlp.experts.gate_up_proj``
    ``[E, 2I, H]``, gate then up; ``down_proj`` ``[E, H, I]``) and writes them per expert; its
    gradients under the names it saves."""
    gate, up, down = roles
    out = {}
    for name, param in hf.named_parameters():
        if param.grad is None:
            continue
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)", name)
        if m is None:
            out[name] = param.grad
            continue
        layer, what = m.groups()
        if what == "gate.weight":
            out[f"{layer}.{block}.gate.weight"] = param.grad
        elif what == "experts.gate_up_proj":
            for e, grad in enumerate(param.grad):
                g, u = grad.chunk(2)
                out[f"{layer}.{block}.experts.{e}.{gate}.weight"] = g
                out[f"{layer}.{block}.experts.{e}.{up}.weight"] = u
        else:
            for e, grad in enumerate(param.grad):
                out[f"{layer}.{block}.experts.{e}.{down}.weight"] = grad
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_family_matches_transformers(tmp_path, backend, name):
    config, block, roles = CONFIGS[name]
    hf = save_hf(tmp_path, config)
    torch.manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (2, 12))
    model = crosschip.from_pretrained(tmp_path, backend=backend)
    assert type(model).__name__ == type(hf).__name__
    expected = hf(ids, labels=ids)
    expected.loss.backward()
    got = model(ids, labels=ids)
    got.loss.backward()
    assert_rel_close(got.logits, expected.logits, TOL, "logits")
    assert_rel_close(got.aux_loss, expected.aux_loss, TOL, "auxiliary loss")
    assert_rel_close(got.loss, expected.loss, TOL, "loss with the auxiliary loss")
    grads, theirs = model.hf_grads(), _transformers_grads(hf, block, roles)
    assert set(grads) == set(theirs)
    for key, grad in theirs.items():
        assert_rel_close(grads[key], grad, TOL, f"grad {key}")
    prompt = ids[:, :4]
    greedy = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=6), greedy)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_checkpoint_round_trip_is_what_transformers_saved(tmp_path, name):
    from safetensors.torch import load_file

    config, _, _ = CONFIGS[name]
    save_hf(tmp_path / "in", config)
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch")
    model.save_pretrained(tmp_path / "out")
    theirs, ours = load_file(tmp_path / "in" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_checkpoint_missing_an_expert_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from crosschip.errors import CheckpointError

    config, block, (gate, _, _) = CONFIGS["mixtral"]
    save_hf(tmp_path, config)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[f"model.layers.2.{block}.experts.3.{gate}.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.block_sparse_moe\.experts\.3\.w1\.weight"):
        crosschip.from_pretrained(tmp_path, backend="torch")


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "olmoe"])
def test_crosschip_train_fine_tunes_a_moe_checkpoint(tmp_path, name):
    """``crosschip train`` on each family's checkpoint: the loss (with the routers' auxiliary loss)
    falls, and the saved checkpoint loads in transformers with the same logits."""
    from transformers import AutoModelForCausalLM

    from crosschip.training.train import TrainArgs, train

    tiny = CONFIGS[name][0]
    config = type(tiny)(**{**tiny.to_dict(), "vocab_size": 320})  # room for the byte-level tokens
    save_hf(tmp_path / "base", config)
    result = train(TrainArgs(model=str(tmp_path / "base"), steps=30, batch_size=4, seq_len=32, lr=3e-3,
                             out=str(tmp_path / "out"), seed=3), progress=False)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5, result.losses
    ids = torch.tensor([list(b"The engineer trains")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf(ids).logits, result.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def _tp_rank(rank: int, world: int, root) -> None:
    from helpers import assert_training_steps_match

    single = crosschip.from_pretrained(root / "moe", backend="torch").train()
    model = crosschip.from_pretrained(root / "moe", backend="torch", tp=2).train()
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_training_steps_match(model, single, ids, TOL, "qwen3_moe tp=2")
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=4), single.generate(ids[:, :4], max_new_tokens=4))


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe"])
def test_moe_at_tp2_matches_one_process(tmp_path, name):
    """Attention and the dense layers sharded over two ranks, every expert whole on each (OLMoE:
    its projection-wide q/k norms reduce their statistics over the ranks)."""
    from gloo_spawn import spawn

    save_hf(tmp_path / "moe", CONFIGS[name][0])
    spawn(2, tmp_path, _tp_rank)
