"""neuronx-distributed's own trainer checkpointing (``save_checkpoint`` / ``load_checkpoint``) in
its CPU mode (``NXD_CPU_MODE=1``, gloo, no Neuron SDK), through the project's stand-ins: at tp 2
and 4, and at tp 1 with two data-parallel replicas (where NxD's xser loader reads each tensor on
one replica and broadcasts it by an all-reduce), in the plain and the xser format. Each rank
saves its own float32 / bfloat16 / int64 tensors (one a non-contiguous view) and an AdamW state,
loads them back bit for bit, and the files are laid out and pickled as NxD writes them on
Trainium (the xser reference file names ``torch_xla.utils.serialization.TensorReference``).

Marked ``neuron_cpu``: skipped without neuronx-distributed, failing instead where
``CROSSCHIP_REQUIRE_HARDWARE=neuron-cpu`` says it must run (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gloo_spawn import spawn
from nxd_checkpoints import load_with_nxd, save_with_nxd

pytestmark = pytest.mark.neuron_cpu

TAG = "step_3"


def _states(tp_rank: int) -> tuple[dict, dict]:
    """A model state and an AdamW state particular to a tp rank (data-parallel replicas alike)."""
    g = torch.Generator().manual_seed(100 + tp_rank)
    weight = torch.randn(4, 8, generator=g)
    weight[0, :3] = torch.tensor([-0.0, float("nan"), float("inf")])  # bits a sum would not keep
    wide = torch.randn(6, 8, generator=g).to(torch.bfloat16)
    model = {
        "layers.0.weight": weight,
        "layers.0.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "layers.0.transposed": wide.t()[1:7:2],  # a strided view into a larger storage
        "rank": torch.tensor([tp_rank], dtype=torch.int64),
    }
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sum((p * p).sum() for p in params).backward()
    optimizer.step()
    return model, optimizer.state_dict()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_same(loaded, saved, where: str) -> None:
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), where
        assert (loaded.dtype, loaded.shape) == (saved.dtype, saved.shape), where
        assert torch.equal(_bits(loaded), _bits(saved)), where
    elif isinstance(saved, dict):
        assert isinstance(loaded, dict) and loaded.keys() == saved.keys(), where
        for key in saved:
            _assert_same(loaded[key], saved[key], f"{where}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        # NxD rebuilds the state through torch_xla's tensor walker, which makes tuples lists.
        assert isinstance(loaded, list) and len(loaded) == len(saved), where
        for i, (a, b) in enumerate(zip(loaded, saved)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert loaded == saved, where


def _template(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _check_files(root: Path, tp: int, use_xser: bool) -> None:
    tag = root / TAG
    # NxD 0.18 writes no "newest" file (its docstring still shows one); load_checkpoint without a
    # tag takes the newest tag holding a "done" marker.
    assert sorted(p.name for p in root.iterdir()) == [TAG]
    assert (tag / "checkpoint").read_text() == "1" and (tag / "done").read_text() == "1"
    names = [f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt" for r in range(tp)]
    for part in ("model", "optim"):
        expected = sorted(names + ([f"{n}{suffix}" for n in names for suffix in (".info.pt", ".tensors")]
                                   if use_xser else []))
        assert sorted(p.name for p in (tag / part).iterdir()) == expected, part
    if not use_xser:
        return
    from crosschip_neuron.xla_standin import TensorReference

    reference = tag / "model" / names[-1]
    with pytest.raises(Exception, match="TensorReference"):
        torch.load(reference, weights_only=True)  # not a global the safe unpickler knows
    with torch.serialization.safe_globals([(TensorReference, "torch_xla.utils.serialization.TensorReference")]):
        refs = torch.load(reference, weights_only=True)
    assert sorted(refs) == ["layers.0.bias", "layers.0.transposed", "layers.0.weight", "rank"]
    assert all(type(r) is TensorReference for r in refs.values())
    tids = sorted(r.tid for r in refs.values())
    assert tids == [0, 1, 2, 3] and all(type(r.__dict__["tid"]) is int and len(r.__dict__) == 1 for r in refs.values())
    tensors = sorted(p.name for p in (tag / "model" / f"{names[-1]}.tensors").iterdir())
    assert tensors == [f"tensor_{i}.pt" for i in tids]
    # .info.pt: tid -> dtype, shape, expert-parallel flag (what the broadcasting loader needs).
    info = torch.load(tag / "model" / f"{names[-1]}.info.pt", weights_only=True)
    by_tid = {r.tid: k for k, r in refs.items()}
    model, _ = _states(tp - 1)
    assert info == {tid: {"dtype": model[k].dtype, "shape": model[k].shape, "expert_model_parallel": False}
                    for tid, k in by_tid.items()}


def _run(rank: int, world: int, root: Path, tp: int) -> None:
    os.environ.update(NXD_CPU_MODE="1", NEURON_PLATFORM_TARGET_OVERRIDE="trn1")
    from crosschip_neuron import cpu_mode

    cpu_mode.nxd()
    from neuronx_distributed.parallel_layers import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    try:
        for use_xser in (False, True):
            directory = root / ("xser" if use_xser else "plain")
            model, optimizer = _states(tp_rank)
            save_with_nxd(directory, TAG, model, optimizer, use_xser)
            loaded_model, loaded_optimizer = load_with_nxd(directory, TAG, _template(model), use_xser,
                                                           optimizer_template={})
            expected = model
            if use_xser and world > tp:
                # NxD's xser loader reads each replicated tensor on one data-parallel replica and
                # broadcasts it as a sum with the others' zeros: a -0.0 comes back +0.0 (so it does
                # on Trainium); every other bit is kept.
                expected = dict(model, **{"layers.0.weight": model["layers.0.weight"] + 0.0})
                assert torch.equal(_bits(expected["layers.0.weight"][0, 1:]), _bits(model["layers.0.weight"][0, 1:]))
            _assert_same(loaded_model, expected, f"model xser={use_xser} rank={rank}")
            _assert_same(loaded_optimizer, optimizer, f"optimizer xser={use_xser} rank={rank}")
            assert loaded_optimizer["param_groups"][0]["betas"] == [0.9, 0.95]  # a list, as on Trainium
            torch.distributed.barrier()
            if rank == 0:
                _check_files(directory, tp, use_xser)
            newest, _ = load_with_nxd(directory, None, {}, use_xser)  # the newest completed tag
            _assert_same(newest, expected, f"newest xser={use_xser} rank={rank}")
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4), (2, 1)], ids=["tp2", "tp4", "tp1-dp2"])
def test_nxd_trainer_checkpoints_round_trip_plain_and_xser(tmp_path, world, tp):
    spawn(world, tmp_path, _run, tp)


def test_tensor_arena_walks_as_torch_xla_does():
    from crosschip_neuron.xla_standin import ToXlaTensorArena

    tied = torch.ones(2)
    other = torch.zeros(3)
    data = {"a": tied, "b": [tied, (other, 1.5)], "betas": (0.9, 0.95), other: "key", "s": {7}}
    calls = []

    def convert(values):
        calls.append(values)
        return [f"t{i}" for i in range(len(values))]

    out = ToXlaTensorArena(convert, lambda v: isinstance(v, torch.Tensor)).transform(data)
    assert len(calls) == 1 and calls[0][0] is tied and calls[0][1] is other and len(calls[0]) == 2
    # The same object converts once; tuples come back lists; dict keys are walked.
    assert out == {"a": "t0", "b": ["t0", ["t1", 1.5]], "betas": [0.9, 0.95], "t1": "key", "s": {7}}
    assert data["a"] is tied and isinstance(data["betas"], tuple)  # the input is left as it was
