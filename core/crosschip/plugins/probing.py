"""Runs a backend's availability probe so that no probe can stall or crash the caller.

A probe runs in a daemon worker thread for at most ``CROSSCHIP_PROBE_TIMEOUT`` seconds (default
10): one that hangs leaves its thread behind (Python cannot stop a thread; a daemon thread does
not keep the process alive) and its backend is unavailable. Whatever goes wrong — a timeout, an
exception, ``sys.exit``, a result that is no :class:`Probe` — becomes an unavailable ``Probe``
whose reason says what happened; the caller caches it, so a probe runs once per process.
"""

from __future__ import annotations

import threading
from typing import Callable

from crosschip.plugins import env
from crosschip.plugins.descriptors import Probe

DEFAULT_TIMEOUT = 10.0


def run_probe(probe: Callable[[], Probe], backend: str) -> Probe:
    timeout = env.seconds(env.PROBE_TIMEOUT, DEFAULT_TIMEOUT)
    outcome: dict[str, object] = {}

    def work():
        try:
            outcome["result"] = probe()
        except BaseException as exc:  # SystemExit too: it would only end this worker thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"crosschip-probe-{backend}", daemon=True)
    worker.start()
    worker.join(timeout)  # KeyboardInterrupt still reaches the caller: it waits in the main thread
    if worker.is_alive():
        return Probe(False, f"availability probe did not return within {timeout:g} s "
                            f"({env.PROBE_TIMEOUT}); not retried in this process")
    if "error" in outcome:
        exc = outcome["error"]
        return Probe(False, f"availability probe raised {type(exc).__name__}: {exc}")
    return checked(outcome["result"])


def checked(result: object) -> Probe:
    """``result`` if it is a well-formed :class:`Probe`, else an unavailable one saying why (a
    truthy string or a bare ``True`` is no proof of availability)."""
    if not isinstance(result, Probe):
        return Probe(False, f"availability probe returned {type(result).__name__} ({result!r}), "
                            "expected crosschip.Probe")
    if not isinstance(result.available, bool) or not isinstance(result.reason, str):
        return Probe(False, f"availability probe returned {result!r}: available must be a bool and "
                            "reason a str")
    return result
