"""Process-group lifecycle helpers shared by the CLI, examples and tests."""

from __future__ import annotations

import gc

#: Names of the DeviceMesh dimensions every backend's parallel plan uses: ``(dp, tp)``.
DP_DIM = "dp"
TP_DIM = "tp"


def shutdown() -> None:
    """Leave the default process group cleanly: wait for every rank, destroy the group, and free
    whatever still holds it before the interpreter exits.

    Why the last step: a model left in a reference cycle (an exception's traceback is enough)
    keeps its DeviceMesh, and with it the gloo group and its worker threads, alive until the
    interpreter's final garbage collection. A worker that then releases a finished collective's
    Python-owned tensor needs the GIL, which a finalizing interpreter no longer hands out; the
    thread exits inside a destructor and the process aborts ("terminate called without an
    active exception") after all the work succeeded. Collecting here, while the interpreter is
    whole, tears the group down in order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank closes its connections while a peer still talks to it
        dist.destroy_process_group()
    gc.collect()
