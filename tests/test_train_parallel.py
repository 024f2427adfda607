"""`crosschip train --tp 2` (gloo, CPU): the same losses as one process, an interrupted and
resumed run reproduces them, and its training state (torch.distributed.checkpoint) resumes at
another layout."""

from __future__ import annotations

import json
from pathlib import Path


from crosschip.train import TrainArgs, train
from gloo_spawn import spawn

ARGS = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, seed=5)


def _run(rank: int, world: int, root: Path) -> None:
    """Every rank trains; rank 0 reports the losses."""
    full = train(TrainArgs(out=str(root / "tp-full"), tp=world, **ARGS), progress=False)
    half = train(TrainArgs(out=str(root / "tp-half"), tp=world, stop_after=4, **ARGS), progress=False)
    resumed = train(TrainArgs(out=str(root / "tp-resumed"), tp=world, resume=str(root / "tp-half"), **ARGS),
                    progress=False)
    sp = train(TrainArgs(out=str(root / "tp-sp"), tp=world, sequence_parallel=True, **ARGS), progress=False)
    if rank == 0:
        (root / "losses.json").write_text(json.dumps(
            {"full": full.losses, "half": half.losses, "resumed": resumed.losses, "sp": sp.losses}))


def test_tp_training_resumes_exactly_and_at_another_layout(tmp_path):
    single = train(TrainArgs(out=str(tmp_path / "single"), **ARGS), progress=False)
    spawn(2, tmp_path, _run)
    losses = json.loads((tmp_path / "losses.json").read_text())
    for a, b in zip(losses["full"], single.losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses["full"], single.losses)
    assert losses["half"] == losses["full"][:4]
    for a, b in zip(losses["sp"], losses["full"]):
        assert abs(a - b) <= 1e-5 * abs(b), (losses["sp"], losses["full"])
    assert losses["resumed"] == losses["full"], "interrupted + resumed run differs from the uninterrupted one"
    # The tp=2 state resumes in a single process (DCP reshards model and optimizer state).
    other_layout = train(TrainArgs(out=str(tmp_path / "tp1-resumed"), resume=str(tmp_path / "tp-half"), **ARGS),
                         progress=False)
    for a, b in zip(other_layout.losses, losses["full"]):
        assert abs(a - b) <= 1e-5 * abs(b), (other_layout.losses, losses["full"])
