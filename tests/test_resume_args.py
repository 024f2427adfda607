"""A resume continues the same run: a changed run-defining argument is refused, naming the saved
and the new value, unless --override says it is intended; what the run used is recorded."""

from __future__ import annotations

import json

import pytest

from crosschip.errors import ConfigurationError
from crosschip.training.resume import parse_overrides
from crosschip.training.train import TrainArgs, train

RUN = dict(steps=3, batch_size=2, seq_len=16, lr=2e-3, seed=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "half"
    train(TrainArgs(out=str(out), stop_after=1, **RUN), progress=False)
    return out


def _meta(directory) -> dict:
    return json.loads((directory / "training_state" / "meta.json").read_text())


def test_changed_hyperparameters_are_refused_naming_both_values(saved, tmp_path):
    with pytest.raises(ConfigurationError, match=r"continues a run with other settings: --seq-len 32 \(saved 16\), "
                                                 r"--lr 0\.001 \(saved 0\.002\); pass the saved values, or "
                                                 r"--override seq_len=32,lr=0\.001 if the change is intended"):
        train(TrainArgs(resume=str(saved), out=str(tmp_path / "x"), **{**RUN, "lr": 1e-3, "seq_len": 32}),
              progress=False)
    with pytest.raises(ConfigurationError, match=r"--model small-llama \(saved tiny-llama\); pass the saved values$"):
        train(TrainArgs(resume=str(saved), model="small-llama", out=str(tmp_path / "x"), **RUN), progress=False)


def test_a_resume_continues_the_saved_settings_it_is_not_given(saved, tmp_path):
    result = train(TrainArgs(resume=str(saved), out=str(tmp_path / "more"), steps=3), progress=False)
    args = _meta(result.out)["args"]
    assert {k: args[k] for k in ("lr", "seed", "batch_size", "seq_len")} == {
        k: v for k, v in RUN.items() if k != "steps"}
    assert len(result.losses) == 3


def test_override_is_applied_and_recorded_while_free_args_change_freely(saved, tmp_path):
    # --steps extends the run, --out and --log-every are free; lr changes because it is overridden.
    given = {k: v for k, v in RUN.items() if k != "lr"}  # --lr left at its default: the override decides
    result = train(TrainArgs(resume=str(saved), out=str(tmp_path / "more"), override=["lr=5e-4"], log_every=2,
                             **{**given, "steps": 4}), progress=False)
    assert len(result.losses) == 4
    args = _meta(result.out)["args"]
    assert (args["lr"], args["steps"], args["override"], args["seed"]) == (5e-4, 4, ["lr=5e-4"], 4)
    # The next resume continues the overridden run: the old lr would now be the change.
    with pytest.raises(ConfigurationError, match=r"--lr 0\.002 \(saved 0\.0005\)"):
        train(TrainArgs(resume=str(result.out), out=str(tmp_path / "y"), **{**RUN, "steps": 5}), progress=False)


def test_override_values_names_and_misuse(saved):
    assert parse_overrides(["lr=1e-4,seed=2", "batch-size=8", "warmup=none"]) == {
        "lr": 1e-4, "seed": 2, "batch_size": 8, "warmup": None}
    for items, message in ((["lr"], "expected name=value with a name among model, text, seed"),
                           (["steps=9"], "expected name=value"),
                           (["seed=two"], "invalid literal for int"),
                           (["lr=1,lr=2"], "--override gives lr twice"),
                           (["model=x"], "--override model: a resume always continues the weights")):
        with pytest.raises(ConfigurationError, match=message):
            parse_overrides(items)
    with pytest.raises(ConfigurationError, match="--override lr applies only with --resume"):
        train(TrainArgs(override=["lr=1"], steps=1), progress=False)
    with pytest.raises(ConfigurationError, match=r"--lr 0\.002 and --override lr=0\.001 disagree"):
        train(TrainArgs(resume=str(saved), override=["lr=1e-3"], **RUN), progress=False)
