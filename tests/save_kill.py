"""Test seam for saves: run a body in a forked child that is SIGKILLed (or blocked) at its Nth
file-system write under a directory, counted by a ``sys.addaudithook`` hook. Deterministic (no
timing), and it needs nothing from the code under test: it sees every open-for-write, rename,
replace, link, symlink, mkdir and removal that Python makes."""

from __future__ import annotations

import os
import signal
import sys

_WRITES = {"os.rename", "os.replace", "os.symlink", "os.link", "os.mkdir", "os.remove", "os.rmdir",
           "os.unlink", "shutil.rmtree", "os.truncate"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _is_write(event: str, args) -> bool:
    if event == "open":
        mode, flags = (args[1], args[2]) if len(args) > 2 else (args[1], 0)
        return bool(set(str(mode or "")) & set("wax+")) or bool((flags or 0) & _WRITE_FLAGS)
    return event in _WRITES


def _under(root: str, args) -> str | None:
    for arg in args:
        if isinstance(arg, (str, bytes, os.PathLike)):
            path = os.fsdecode(arg)
            if path.startswith(root):
                return path
    return None


def run_child(body, root, *, kill_at: int | None = None, block_when=None, ready_fd: int | None = None,
              log: str | None = None) -> int:
    """Fork; the child runs ``body()`` and exits 0 (or 3 on an exception). With ``kill_at`` it
    SIGKILLs itself just before its ``kill_at``-th write under ``root`` (after appending the event
    to ``log``); with ``block_when(event, path)`` it writes one byte to ``ready_fd`` and blocks
    forever at the first write that predicate accepts. Returns the child's pid."""
    root = os.fspath(root)
    pid = os.fork()
    if pid:
        return pid
    try:
        import torch

        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork; one thread does
        signal.alarm(120)  # a watchdog only: a hung child fails the test instead of hanging it
        count = 0

        def hook(event, args):
            nonlocal count
            if not _is_write(event, args):
                return
            path = _under(root, args)
            if path is None:
                return
            count += 1
            if kill_at is not None and count == kill_at:
                if log:
                    with open(log, "a") as stream:  # outside root: not counted
                        stream.write(f"{count} {event} {[str(a) for a in args]}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            if block_when is not None and block_when(event, path):
                os.write(ready_fd, b"x")
                signal.pause()

        sys.addaudithook(hook)
        body()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def wait(pid: int) -> int:
    """The child's exit status, or minus the signal that ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
