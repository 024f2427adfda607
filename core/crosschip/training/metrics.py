"""Step metrics of a training run: ``--out/metrics.jsonl``, and TensorBoard / Weights & Biases
when asked for (``--log tensorboard,wandb``) and installed; nothing is sent anywhere otherwise.

``metrics.jsonl`` lives beside the checkpoint, never inside a save: a save writes only into its
staging directory and touches only the names it writes (``checkpoint/transaction.py``), so the
file survives every save, and a kill between two saves can leave rows past the last one. A run
therefore starts the file from the rows of the run it resumes, up to the step it resumes at
(read from ``--resume``'s own ``metrics.jsonl``), and appends to that; a fresh run starts it
empty. The file is first written at the first logged step, so a run refused or stopped before
it leaves none. Only rank 0 writes. Values are host floats already read back from the device:
logging adds no synchronisation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

from crosschip.errors import ConfigurationError

FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: ``--log`` name -> the package it needs
SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_log(log: str | None) -> list[str]:
    """``"tensorboard,wandb"`` -> the sinks, each checked to be known and installed."""
    names = [n.strip() for n in (log or "").split(",") if n.strip()]
    for name in names:
        if name not in SINKS:
            raise ConfigurationError(f"--log {name!r}: unknown; choose among {', '.join(SINKS)} "
                                     f"(comma-separated; {FILE} is always written)")
        if importlib.util.find_spec(SINKS[name]) is None:
            raise ConfigurationError(f"--log {name}: the {SINKS[name]!r} package is not installed; "
                                     f"pip install {SINKS[name]}, or leave {name} out of --log")
    return names


def peak_memory_bytes(device) -> int | None:
    """The peak memory of this run on ``device``: the CUDA caching allocator's peak (no device
    synchronisation), the process's peak resident set on CPU, None where nothing reports it."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
    return None


class StepMetrics:
    """``log(step, values)`` one row per logged step; ``close()`` at the end of the run."""

    def __init__(self, out: str | Path, *, sinks=(), resume: str | Path | None = None, start: int = 0,
                 config: dict | None = None, enabled: bool = True):
        self.path = Path(out) / FILE
        self.sinks, self.resume, self.start = list(sinks), resume, start
        self.config, self.enabled = config or {}, enabled
        self._file = None
        self._writers: list = []  # (step, values) -> None, one per sink asked for
        self._closers: list = []

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        row = {"step": step, **values, "wall_time": time.time()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a run killed later still has every row it logged
        for write in self._writers:
            write(step, values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for close in self._closers:
            close()
        self._writers, self._closers = [], []

    def _open(self) -> None:
        earlier = _rows_up_to(Path(self.resume) / FILE, self.start) if self.resume else []
        tmp = self.path.with_name(f".{FILE}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in earlier))
        os.replace(tmp, self.path)  # the earlier rows, then appended to: never a half-copied file
        self._file = self.path.open("a")
        if "tensorboard" in self.sinks:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a killed run wrote past the step resumed at are dropped.
            writer = SummaryWriter(log_dir=str(self.path.parent / TENSORBOARD_DIR),
                                   purge_step=self.start + 1 if self.start else None)
            self._writers.append(lambda step, values: [writer.add_scalar(f"train/{k}", v, step)
                                                       for k, v in values.items() if v is not None])
            self._closers.append(writer.close)
        if "wandb" in self.sinks:
            import wandb

            # The user's own wandb settings (WANDB_MODE, WANDB_PROJECT, login) decide where it goes.
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "crosschip"), config=self.config,
                             dir=str(self.path.parent))
            self._writers.append(lambda step, values: run.log(
                {f"train/{k}": v for k, v in values.items() if v is not None}, step=step))
            self._closers.append(run.finish)


def _rows_up_to(path: Path, step: int) -> list[str]:
    """The rows of ``path`` for steps up to ``step`` (none when it does not exist); a last line a
    kill cut short is not a row."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line)
    return rows
