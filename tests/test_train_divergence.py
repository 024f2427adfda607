"""A NaN or infinite loss stops `crosschip train` with the step and the loss, before anything is
saved (the last good checkpoint in --out stays byte for byte), and the loop reads losses back
from the device only every --log-every steps."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosschip.errors import TrainingDivergedError
from crosschip.training.train import TrainArgs, train

SMALL = ["--batch-size", "2", "--seq-len", "16", "--quiet"]


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` but the output lock (it records the last holder's pid, and
    the diverging run held it; it is no part of any save)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).as_posix() != ".crosschip/lock"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "crosschip.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_stops_on_nan_loss_and_keeps_the_last_good_save(tmp_path):
    out = tmp_path / "run"
    train(TrainArgs(steps=3, stop_after=1, batch_size=2, seq_len=16, out=str(out)), progress=False)
    before = _files(out)
    # An lr of 1e30 turns the weights into ~1e30 after one step: the next gradient is NaN.
    bad = _cli("train", "--resume", str(out), "--out", str(out), "--steps", "3", "--override", "lr=1e30",
               "--log-every", "2", *SMALL)
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert "Traceback" not in bad.stderr
    error = bad.stderr.strip().splitlines()
    assert len(error) == 1, bad.stderr
    assert error[0].startswith("crosschip: error: training diverged at step 3 of 3: loss "), error
    assert "nan" in error[0].split("; stopped")[0], error
    assert f"{out} keeps its previous checkpoint" in error[0]
    assert _files(out) == before  # weights, tokenizer and training state untouched


def test_poisoned_weights_stop_at_the_first_step_whatever_the_interval(tmp_path):
    from helpers import save_hf_llama

    model = save_hf_llama(tmp_path / "poisoned", vocab_size=258)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "poisoned")
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step 1 of 3: loss nan") as caught:
        train(TrainArgs(model=str(tmp_path / "poisoned"), steps=3, batch_size=2, seq_len=16, log_every=5,
                        out=str(tmp_path / "never")), progress=False)
    assert caught.value.step == 1 and math.isnan(caught.value.loss)
    assert not (tmp_path / "never").exists()  # nor the lock the run took there before its first step


def test_losses_do_not_depend_on_the_logging_interval(tmp_path):
    runs = [train(TrainArgs(steps=5, batch_size=2, seq_len=16, seed=1, log_every=every,
                            out=str(tmp_path / str(every))), progress=False) for every in (1, 3)]
    assert len(runs[0].losses) == 5 and runs[0].losses == runs[1].losses


@pytest.mark.cuda
def test_no_host_sync_per_training_step_on_cuda(tmp_path):
    """torch counts synchronizing CUDA calls in its sync debug mode: a run of 8 steps makes no
    more of them than a run of 3 (one read-back at the end each, --log-every larger than both)."""
    import warnings

    def syncs(steps: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(TrainArgs(steps=steps, batch_size=2, seq_len=16, device="cuda", log_every=100,
                                out=str(tmp_path / str(steps))), progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)

    syncs(2)  # warm-up: lazy initialisation syncs once per process
    assert syncs(8) == syncs(3)
