"""`crosschip train --tp 2` and `--tp 2 --dp 2` (gloo, CPU): the same losses as one process, an
interrupted and resumed run reproduces them, and its training state (torch.distributed.checkpoint)
resumes at another layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crosschip.errors import ConfigurationError
from crosschip.training.train import TrainArgs, train
from gloo_spawn import spawn
from helpers import save_hf_llama, train_interrupted, transplant_training_state

ARGS = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, seed=5)


def _assert_losses_close(got, expected, tol=1e-5):
    assert len(got) == len(expected) == ARGS["steps"], (got, expected)
    for a, b in zip(got, expected):
        assert abs(a - b) <= tol * abs(b), (got, expected)


def _run(rank: int, world: int, root: Path) -> None:
    """Every rank trains; rank 0 reports the losses."""
    losses = train_interrupted(root, "tp", 4, tp=world, **ARGS)
    losses["sp"] = train(TrainArgs(out=str(root / "tp-sp"), tp=world, sequence_parallel=True, **ARGS),
                         progress=False).losses
    if rank == 0:
        (root / "losses.json").write_text(json.dumps(losses))


def test_tp_training_resumes_exactly_and_at_another_layout(tmp_path):
    single = train(TrainArgs(out=str(tmp_path / "single"), **ARGS), progress=False)
    spawn(2, tmp_path, _run)
    losses = json.loads((tmp_path / "losses.json").read_text())
    _assert_losses_close(losses["full"], single.losses)
    assert losses["half"] == losses["full"][:4]
    _assert_losses_close(losses["sp"], losses["full"])
    assert losses["resumed"] == losses["full"], "interrupted + resumed run differs from the uninterrupted one"
    # The tp=2 state resumes in a single process (DCP reshards model and optimizer state).
    other_layout = train(TrainArgs(out=str(tmp_path / "tp1-resumed"), resume=str(tmp_path / "tp-half"), **ARGS),
                         progress=False)
    _assert_losses_close(other_layout.losses, losses["full"])

    # The sharded state in the directory of a different model: refused, naming the shapes.
    save_hf_llama(tmp_path / "narrow", vocab_size=300, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    other = train(TrainArgs(model=str(tmp_path / "narrow"), out=str(tmp_path / "narrow-out"),
                            **{**ARGS, "steps": 1}), progress=False)
    transplant_training_state(tmp_path / "tp-half", other.out)
    with pytest.raises(ConfigurationError, match=r"training_state: this training state does not fit this model: "
                                                 r"model\.embed_tokens\.weight has shape \(258, 128\) "
                                                 r"there, \(300, 32\) in this model.*saved at tp=2, dp=1 and this run "
                                                 r"has tp=1, dp=1"):
        train(TrainArgs(out=str(tmp_path / "never"), resume=str(other.out), **ARGS), progress=False)


def _run_dp(rank: int, world: int, root: Path) -> None:
    losses = train_interrupted(root, "dp", 4, tp=2, dp=2, **ARGS)
    # The tp=2 x dp=2 state resumed as dp=4 (FSDP2 alone).
    losses["dp4"] = train(TrainArgs(out=str(root / "dp4-resumed"), resume=str(root / "dp-half"), dp=4, **ARGS),
                          progress=False).losses
    if rank == 0:
        (root / "losses.json").write_text(json.dumps(losses))


def test_tp_dp_training_matches_and_resumes_at_other_layouts(tmp_path):
    single = train(TrainArgs(out=str(tmp_path / "single"), **ARGS), progress=False)
    spawn(4, tmp_path, _run_dp)
    losses = json.loads((tmp_path / "losses.json").read_text())
    _assert_losses_close(losses["full"], single.losses)
    assert losses["half"] == losses["full"][:4]
    assert losses["resumed"] == losses["full"], "interrupted + resumed run differs from the uninterrupted one"
    _assert_losses_close(losses["dp4"], losses["full"])
    # ... and in a single process.
    alone = train(TrainArgs(out=str(tmp_path / "alone"), resume=str(tmp_path / "dp-half"), **ARGS), progress=False)
    _assert_losses_close(alone.losses, losses["full"])


def test_batch_that_dp_does_not_divide_is_an_error(tmp_path):
    with pytest.raises(ConfigurationError, match="--batch-size 6 is not divisible by --dp 4"):
        train(TrainArgs(out=str(tmp_path / "x"), **{**ARGS, "batch_size": 6}, dp=4), progress=False)


def test_cli_under_torchrun_trains_tp_dp_and_exits_cleanly(tmp_path):
    """`torchrun -m crosschip.cli train --tp 2 --dp 2`: every rank exits 0 (the process group is
    torn down before the interpreter ends), rank 0 alone prints, the checkpoint loads."""
    import subprocess
    import sys

    import crosschip

    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
         "-m", "crosschip.cli", "train", "--tp", "2", "--dp", "2", "--steps", "2", "--batch-size", "4",
         "--seq-len", "32", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved a Hugging Face checkpoint to") == 1, result.stdout
    crosschip.from_pretrained(out, backend="reference")
