"""Saves during a run: ``--save-every N`` writes ``out/checkpoint-<step>/``, each its own managed
checkpoint (one atomic save, as the final one in ``out``), and ``--keep-last K`` keeps the K
newest of them.

A save carries its run's id (``run_id`` in ``training_state/meta.json``, kept across resumes),
and pruning removes only ``checkpoint-<step>`` directories holding this run's id: a directory
the user put there, or a save of another run, is never touched. A directory is first renamed
out of the ``checkpoint-*`` namespace, then removed, so a crash mid-removal never leaves a
half-removed directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from crosschip.errors import ConfigurationError

PATTERN = re.compile(r"checkpoint-(\d+)")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def run_id_of(directory: Path) -> str | None:
    """The run id recorded by the save in ``directory`` (None: none, or not readable)."""
    try:
        return json.loads((directory / "training_state" / "meta.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def check_targets(out: str | Path, steps, run_id: str, overwrite: bool) -> None:
    """Before training: refuse a ``checkpoint-<step>`` this run would write that already holds
    a checkpoint of another run (unless ``--overwrite``)."""
    from crosschip.checkpoint.transaction import holds_checkpoint

    for step in steps:
        target = checkpoint_dir(out, step)
        if target.is_dir() and holds_checkpoint(target) and run_id_of(target) != run_id and not overwrite:
            raise ConfigurationError(f"--save-every: {target} already holds a checkpoint of another run; pass "
                                     "--overwrite to replace it, or choose another --out")


def prune(out: str | Path, run_id: str, keep_last: int | None) -> list[Path]:
    """Remove this run's ``checkpoint-<step>`` saves but the ``keep_last`` newest; the removed."""
    if keep_last is None:
        return []
    ours = []
    for entry in Path(out).iterdir():
        match = PATTERN.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and run_id_of(entry) == run_id:
            ours.append((int(match.group(1)), entry))
    removed = [entry for _, entry in sorted(ours)[:-keep_last]]
    for entry in removed:
        doomed = entry.with_name(f".{entry.name}.removing-{os.getpid()}")
        os.replace(entry, doomed)
        shutil.rmtree(doomed)
    return removed
