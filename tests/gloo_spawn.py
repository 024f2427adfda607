"""Running a test body in separate processes joined by a process group: gloo on CPU, or NCCL with
one GPU per rank."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

_launches = itertools.count()


def _entry(rank: int, world: int, root: str, rendezvous: str, body, args, backend: str) -> None:
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
        # float32 parity means float32 (TE's own GEMMs use TF32 whatever these say).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)  # two cores shared by every rank
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        body(rank, world, Path(root), *args)
    except BaseException:
        dist.destroy_process_group()  # a failed rank must not wait on a barrier its peers skip
        raise
    from crosschip.parallel.distributed import shutdown

    shutdown()


def spawn(world: int, root: Path, body, *args, backend: str = "gloo") -> None:
    """``body(rank, world, root, *args)`` in ``world`` processes; a failure in any rank fails the
    caller with that rank's traceback. ``body`` must be a module-level function (it is pickled)."""
    import torch.multiprocessing as mp

    rendezvous = Path(root) / f"rendezvous-{world}-{next(_launches)}"
    mp.spawn(_entry, args=(world, str(root), str(rendezvous), body, args, backend), nprocs=world, join=True)
