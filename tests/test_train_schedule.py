"""The training loop's options: warm-up and each decay follow their formula, N micro-batches of B
are one batch of N*B, and a --data run stopped mid-epoch resumes bitwise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crosschip.errors import ConfigurationError
from crosschip.training.train import TrainArgs, learning_rate, train
from helpers import save_hf_llama, train_interrupted


@pytest.mark.parametrize("schedule, after_warmup", [
    ("cosine", lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))),
    ("linear", lambda p: 0.1 + 0.9 * (1 - p)),
    ("constant", lambda p: 1.0),
])
def test_warmup_then_each_decay_follows_its_formula(schedule, after_warmup):
    args = TrainArgs(steps=110, warmup=10, lr=2e-3, lr_schedule=schedule)
    for step in (0, 4, 9):  # linear warm-up to the peak
        assert learning_rate(step, args) == pytest.approx(2e-3 * (step + 1) / 10, rel=1e-12)
    for step in (10, 35, 60, 109, 150):  # progress over the 100 steps after it, held at the end
        progress = min(1.0, (step - 10) / 100)
        assert learning_rate(step, args) == pytest.approx(2e-3 * after_warmup(progress), rel=1e-12), step
    assert learning_rate(109, args) > learning_rate(110, args) or schedule == "constant"


def _documents(tmp_path):
    """Documents of varied lengths, so batches carry padding and uneven label counts."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"{n} " + "abc de " * (1 + n % 5)}) + "\n" for n in range(10)))
    save_hf_llama(tmp_path / "model", vocab_size=300)
    return dict(model=str(tmp_path / "model"), data=str(path), seq_len=40, seed=2)


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    from safetensors.torch import load_file

    common = dict(**_documents(tmp_path), steps=2, lr=1e-2, warmup=1)
    micro = train(TrainArgs(batch_size=2, grad_accumulation=3, out=str(tmp_path / "micro"), **common), progress=False)
    big = train(TrainArgs(batch_size=6, out=str(tmp_path / "big"), **common), progress=False)
    for a, b in zip(micro.losses, big.losses):
        assert abs(a - b) <= 1e-5 * abs(b), (micro.losses, big.losses)
    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("micro", "big"))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=key)


def test_data_run_stopped_mid_epoch_resumes_bitwise_and_keeps_its_schedule(tmp_path):
    # 10 rows, 4 per step (2 x 2 micro-batches): the stop after step 3 falls inside the second epoch.
    args = dict(**_documents(tmp_path), steps=6, batch_size=2, grad_accumulation=2, lr_schedule="linear",
                weight_decay=0.1, max_grad_norm=0.5, long_documents="split")
    losses = train_interrupted(tmp_path, "data", stop_after=3, **args)
    assert len(losses["half"]) == 3
    assert losses["resumed"] == losses["full"]
    # The new options define the run: a resume given another value is refused, naming both.
    with pytest.raises(ConfigurationError, match=r"--lr-schedule constant \(saved linear\).*--grad-accumulation 3 "
                                                 r"\(saved 2\)"):
        train(TrainArgs(**{**args, "lr_schedule": "constant", "grad_accumulation": 3},
                        resume=str(tmp_path / "data-half"), out=str(tmp_path / "never")), progress=False)
