"""Expert parallelism on the torch backend (gloo, CPU): each data-parallel rank holds half of every
layer's experts, tokens travel to their experts' ranks and back (all-to-all), FSDP2 shards the
rest; the mean of the ranks' losses, every gradient, AdamW steps and the saved checkpoint equal
one process on the whole batch, and each rank reads only its own experts from the checkpoint. The config leaves the routers' auxiliary loss out of the loss:
it is a nonlinear function of batch-wide routing statistics, which a data-parallel rank (with or
without expert parallelism) computes over its own part of the batch only."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

import crosschip
from crosschip.errors import ConfigurationError
from gloo_spawn import spawn
from helpers import assert_parallel_grads_match, assert_rel_close, assert_saves_alike
from zoo import save_hf

TOL = 1e-5


def _config(**overrides):
    from transformers import Qwen3MoeConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
                norm_topk_prob=True, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return Qwen3MoeConfig(**{**base, **overrides})


def _mean(value, group):
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


@contextlib.contextmanager
def _reads():
    """The checkpoint keys read while loading (whole or in slices)."""
    from crosschip.checkpoint.reader import SafetensorsCheckpoint

    read, get, get_slice = set(), SafetensorsCheckpoint.get, SafetensorsCheckpoint.get_slice

    def whole(self, key):
        read.add(key)
        return get(self, key)

    def part(self, key, index):
        read.add(key)
        return get_slice(self, key, index)

    SafetensorsCheckpoint.get, SafetensorsCheckpoint.get_slice = whole, part
    try:
        yield read
    finally:
        SafetensorsCheckpoint.get, SafetensorsCheckpoint.get_slice = get, get_slice


def _rank(rank: int, world: int, root: Path, tp: int = 1, device: str = "cpu", dp: int = 2,
          compile: bool = False) -> None:
    from torch.distributed.tensor import DTensor

    single = crosschip.from_pretrained(root / "moe", backend="torch", device=device).train()
    with _reads() as read:
        model = crosschip.from_pretrained(root / "moe", backend="torch", dp=dp, ep=2, tp=tp, device=device,
                                          compile=compile).train()
    experts = model.model.layers[0].mlp
    assert isinstance(experts.gate_up_proj, DTensor) and experts.gate_up_proj.to_local().shape[0] == 3
    assert_saves_alike(model, single, root / f"saved-tp{tp}-dp{dp}", rank, f"ep=2 tp={tp} dp={dp}")
    mesh = model.runtime.device_mesh
    group, dp_rank = (mesh.get_group("dp"), mesh.get_local_rank("dp")) if tp > 1 else (mesh.get_group(), rank)
    experts_read = {int(key.split(".experts.")[1].split(".")[0]) for key in read if ".experts." in key}
    ep_rank = dp_rank % 2  # dp ranks form dp/ep groups of ep consecutive ranks
    assert experts_read == set(range(3 * ep_rank, 3 * ep_rank + 3)), (rank, sorted(experts_read))
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1)).to(device)
    part = ids.chunk(dp)[dp_rank]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-3) for m in (single, model)]
    for step in range(3):
        expected = single(ids, labels=ids)
        expected.loss.backward()
        got = model(part, labels=part)
        got.loss.backward()
        at = f"ep=2 dp={dp} step {step}"
        assert_rel_close(got.logits, expected.logits.chunk(dp)[dp_rank], TOL, f"{at} logits")
        assert_rel_close(_mean(got.loss, group), expected.loss, TOL, f"{at} loss")
        assert_parallel_grads_match(model, single, TOL, at)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    if tp == 1 and dp == 2 and not compile:
        with pytest.raises(ConfigurationError, match=r"ep=2 does not divide the number of experts \(5\)"):
            crosschip.from_pretrained(root / "moe5", backend="torch", dp=2, ep=2, device=device)


def test_ep2_matches_one_process(tmp_path):
    save_hf(tmp_path / "moe", _config())
    save_hf(tmp_path / "moe5", _config(num_experts=5))
    spawn(2, tmp_path, _rank)


def test_ep2_with_tp2_attention_matches_one_process(tmp_path):
    """(dp=ep=2) x tp=2: attention and dense layers tensor-parallel inside each expert-parallel rank."""
    save_hf(tmp_path / "moe", _config())
    spawn(4, tmp_path, _rank, 2)


def test_ep2_within_dp4_matches_one_process(tmp_path):
    """ep=2 inside dp=4: two groups of two ranks, each group holding every expert once; an
    expert's gradient is summed over the group that does not hold its copy."""
    save_hf(tmp_path / "moe", _config())
    spawn(4, tmp_path, _rank, 1, "cpu", 4)


@pytest.mark.slow
def test_ep2_compiled_matches_one_process(tmp_path):
    """compile=True with ep=2: the blocks compile around the all-to-all exchange (left eager: it
    needs host split sizes, and DTensor shards cannot cross a compiled graph)."""
    save_hf(tmp_path / "moe", _config())
    spawn(2, tmp_path, _rank, 1, "cpu", 2, True)


def test_ep_must_divide_dp():
    from crosschip.specs import ParallelSpec

    for dp in (1, 3):
        with pytest.raises(ConfigurationError, match=f"ep=2 shards the experts over groups of data-parallel ranks, "
                                                     f"so it must divide dp \\(found dp={dp}\\)"):
            ParallelSpec(dp=dp, ep=2)
    assert ParallelSpec(dp=4, ep=2).ep == 2


def _train_rank(rank: int, world: int, root: Path, in_backward: bool = False) -> None:
    from crosschip.training.train import TrainArgs, train

    result = train(TrainArgs(model=str(root / "moe"), out=str(root / "ep"), dp=2, ep=2, **_train(in_backward)),
                   progress=False)
    losses, experts = result.losses, result.model.model.layers[0].mlp
    assert experts.gate_up_proj.to_local().shape[0] == 3  # this rank's half of the 6 experts
    if rank == 0:
        (root / "losses.json").write_text(json.dumps(losses))


_TRAIN = dict(steps=4, batch_size=4, seq_len=16, lr=3e-3, seed=5)


def _train(in_backward: bool) -> dict:
    # stepping in the backward cannot clip by the global norm: neither run clips then
    return dict(_TRAIN, optimizer_in_backward=True, max_grad_norm=0.0) if in_backward else _TRAIN


@pytest.mark.parametrize("in_backward", [False, True], ids=["after-backward", "optimizer-in-backward"])
def test_crosschip_train_with_ep2_matches_one_process(tmp_path, in_backward):
    """``crosschip train --dp 2 --ep 2``: the same losses as one process training on the whole batch,
    also with the optimizer stepping in the backward, where the experts' shards (on the expert
    mesh) and the other parameters' (FSDP2's) wait in one bucket and step together."""
    from crosschip.training.train import TrainArgs, train

    save_hf(tmp_path / "moe", _config(vocab_size=320))  # room for the byte-level tokens
    spawn(2, tmp_path, _train_rank, in_backward)
    # one process steps after the backward, clipping as the ranks do (not at all in backward)
    one = dict(_TRAIN, max_grad_norm=0.0) if in_backward else _TRAIN
    expected = train(TrainArgs(model=str(tmp_path / "moe"), out=str(tmp_path / "one"), **one), progress=False).losses
    got = json.loads((tmp_path / "losses.json").read_text())
    assert len(got) == len(expected) == _TRAIN["steps"]
    for a, b in zip(got, expected):
        assert abs(a - b) <= TOL * abs(b), (got, expected)
    import crosschip.cli

    args = crosschip.cli.build_parser().parse_args(["train", "--dp", "2", "--ep", "2"])
    assert (args.dp, args.ep) == (2, 2)
