"""Step metrics: ``OUT/metrics.jsonl`` has one row per logged step, survives the run's saves and a
resume that appends to it; TensorBoard gets the same scalars when asked; a sink asked for but not
installed is a one-line error before anything is written."""

from __future__ import annotations

import importlib.util
import json

import pytest

from crosschip.training.metrics import FILE, SINKS
from crosschip.training.train import TrainArgs, learning_rate, train

KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "wall_time"}


def _args(tmp_path, **kw):
    return TrainArgs(**{**dict(steps=6, batch_size=2, seq_len=16, out=str(tmp_path / "out"), seed=1,
                               log_every=2), **kw})


def _rows(out):
    return [json.loads(line) for line in (out / FILE).read_text().splitlines()]


def test_one_row_per_logged_step_kept_by_saves_and_appended_by_a_resume(tmp_path):
    first = train(_args(tmp_path, stop_after=3), progress=False)
    rows = _rows(first.out)
    assert [r["step"] for r in rows] == [2, 3]  # every --log-every steps, and the last
    assert all(set(r) == KEYS for r in rows), rows
    assert [r["loss"] for r in rows] == [first.losses[1], first.losses[2]]
    assert [r["lr"] for r in rows] == [learning_rate(step - 1, _args(tmp_path)) for step in (2, 3)]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 2**20 for r in rows)
    entries = json.loads((first.out / ".crosschip" / "current" / "manifest.json").read_text())["entries"]
    assert FILE not in entries and not (first.out / ".crosschip" / "current" / FILE).exists()  # not in a save
    # What a run killed after its last save leaves: rows past that save, the last one cut short.
    with (first.out / FILE).open("a") as f:
        f.write(json.dumps({**rows[-1], "step": 4}) + "\n" + '{"step": 5, "lo')
    resumed = train(_args(tmp_path, resume=str(first.out)), progress=False)
    rows = _rows(resumed.out)
    assert [r["step"] for r in rows] == [2, 3, 5, 6]
    assert [r["loss"] for r in rows] == [resumed.losses[i - 1] for i in (2, 3, 5, 6)]
    # Resumed into another --out: that file starts with the rows of the run it continues.
    again = train(_args(tmp_path, steps=8, resume=str(first.out), out=str(tmp_path / "other")), progress=False)
    assert [r["step"] for r in _rows(again.out)] == [2, 3, 5, 6, 8]


def test_tensorboard_gets_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_args(tmp_path, steps=4, log="tensorboard"), progress=False)
    events = EventAccumulator(str(result.out / "tensorboard"))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars == pytest.approx({r["step"]: r["loss"] for r in _rows(result.out)}, rel=1e-6)


@pytest.mark.parametrize("name", ["wandb", "nothing"])
def test_a_sink_not_installed_or_unknown_is_one_line_before_any_output(tmp_path, capsys, name):
    from crosschip.cli import main

    if name in SINKS and importlib.util.find_spec(SINKS[name]) is not None:
        pytest.skip(f"{name} is installed here")
    assert main(["train", "--log", name, "--out", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err
    expected = (f"--log {name}: the {name!r} package is not installed" if name in SINKS
                else "--log 'nothing': unknown; choose among tensorboard, wandb")
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "never").exists()
