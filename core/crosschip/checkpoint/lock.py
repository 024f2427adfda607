"""The exclusive lock on an output directory: ``.crosschip/lock`` inside it, ``flock``-ed for
the whole of a save (and by ``crosschip train`` for the whole run), holding the holder's pid so a
second writer's error can name it. The kernel drops the lock when its holder dies, so a killed
run never leaves the output locked; the file itself stays (removing it would race)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from crosschip.errors import CheckpointError

CONTROL = ".crosschip"
LOCK = "lock"


_held: dict[str, list] = {}  # real path of a lock file -> [fd, depth]: re-entrant per process


@contextlib.contextmanager
def output_lock(directory: str | Path):
    """Hold ``directory/.crosschip/lock`` exclusively (``flock``), or fail naming the holder."""
    import fcntl

    directory = Path(directory)
    try:
        (directory / CONTROL).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: {exc}") from exc
    path = directory / CONTROL / LOCK
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{directory}: another process (pid {holder}) is writing a checkpoint "
                                  f"there ({path} is locked); wait for it to finish or choose another "
                                  "output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            os.close(_held.pop(key)[0])  # closing releases the flock
