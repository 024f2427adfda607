"""The exclusive lock on an output directory: ``.crosschip/lock`` inside it, ``flock``-ed for
the whole of a save (and by ``crosschip train`` for the whole run), holding the holder's pid so a
second writer's error can name it. The kernel drops the lock when its holder dies, so a killed
run never leaves the output locked. The file stays once a save lives beside it; a holder that
created the directory and saved nothing removes it again, and a locker checks that the file it
locked is still the one at the path, so that removal cannot let two writers in."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from crosschip.errors import CheckpointError

CONTROL = ".crosschip"
LOCK = "lock"


_held: dict[str, list] = {}  # real path of a lock file -> [fd, depth, created]: re-entrant per process


@contextlib.contextmanager
def output_lock(directory: str | Path):
    """Hold ``directory/.crosschip/lock`` exclusively (``flock``), or fail naming the holder.
    Where this lock created ``directory`` and nothing was saved there by the time it is released
    (a first save that failed, a run stopped before saving), it removes what it created."""
    directory = Path(directory)
    created = not directory.exists()
    try:
        (directory / CONTROL).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: {exc}") from exc
    path = directory / CONTROL / LOCK
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_acquire(directory, path), 1, created]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fd, _, made = _held.pop(key)
            if made:
                _remove_if_unused(directory, path)  # still holding the lock, see _acquire
            os.close(fd)  # closing releases the flock


def _acquire(directory: Path, path: Path) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{directory}: another process (pid {holder}) is writing a checkpoint "
                                  f"there ({path} is locked); wait for it to finish or choose another "
                                  "output directory") from None
        # A holder that removed the file (below) before we locked it: our lock is on a file no one
        # else will open; take the one at the path now.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
        (directory / CONTROL).mkdir(parents=True, exist_ok=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_if_unused(directory: Path, path: Path) -> None:
    """Remove the lock file, ``.crosschip`` and ``directory`` if they hold nothing else."""
    try:
        if os.listdir(directory / CONTROL) != [LOCK] or os.listdir(directory) != [CONTROL]:
            return
        os.unlink(path)
        os.rmdir(directory / CONTROL)
        os.rmdir(directory)
    except OSError:  # another writer arrived meanwhile: leave it its directory
        pass
