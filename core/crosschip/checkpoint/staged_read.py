"""Loading whole (unsharded) components by copying checkpoint bytes straight into place.

Each checkpoint tensor is read once, in pieces of at most ``CHUNK_BYTES``, with ``os.preadv``
from the file (no memory map: no page faults on the mapped file, no mapped pages counted against
the process), by a few threads at once (the read releases the GIL, so reads overlap each other and
the copies). Where a piece lands comes from :mod:`crosschip.checkpoint.placement`:

- a checkpoint tensor that is one run of rows of one physical tensor, in the same dtype (an
  embedding, a norm, ``o_proj``, ``down_proj``, Transformer Engine's gate and up halves) is read
  straight into the parameter on the CPU, or into a pinned staging buffer and copied
  asynchronously to the GPU, straight into the parameter;
- anything else (the grouped QKV, the torch backend's gate/up row interleave, a dtype cast) is
  copied to the model's device as it is stored and put in place there by one indexed
  copy, so the layout transform costs device bandwidth, not host passes.

Host memory is bounded by ``BUFFERS`` staging buffers of ``CHUNK_BYTES`` each (or of one row,
where a row is larger), whatever the model size: there is never a host copy of a whole tensor, let alone of the model. A staging buffer is
refilled only after the copy that reads it has completed (a CUDA event).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from crosschip.checkpoint.placement import Placement, placements
from crosschip.checkpoint.sharded_load import CHUNK_BYTES
from crosschip.errors import CheckpointError

#: Staging buffers (and reads) in flight: enough to keep a few threads reading while the copies
#: of earlier pieces run; host memory of a load is at most BUFFERS * CHUNK_BYTES beyond the model.
BUFFERS = 8


@dataclass
class Piece:
    """Rows ``[first, stop)`` of one checkpoint tensor: its bytes in the file and where they go."""

    key: str
    location: object  # reader.TensorLocation
    first: int
    stop: int
    row_bytes: int
    placements: list[Placement]
    direct: Placement | None  # the one straight, same-dtype placement of the whole tensor, if any

    @property
    def offset(self) -> int:
        return self.location.offset + self.first * self.row_bytes

    @property
    def nbytes(self) -> int:
        return (self.stop - self.first) * self.row_bytes


def plan(bindings, source, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[Piece], list]:
    """The pieces that load ``bindings`` from ``source`` (sorted by file and offset), and the
    bindings this loader cannot place (left to the transforms)."""
    by_key: dict[str, list[Placement]] = {}
    rest, device = [], None
    for binding in bindings:
        planned = placements(binding)
        if planned == []:
            continue  # no weights (attention, rotary): nothing to load
        devices = {p.target.device for p in planned or ()}
        one = next(iter(devices)) if len(devices) == 1 else None
        # One CPU or CUDA device per load; a meta or stray tensor goes through the transforms.
        if planned is None or one is None or one.type not in ("cpu", "cuda") or device not in (None, one):
            rest.append(binding)
            continue
        device = one
        for p in planned:
            by_key.setdefault(p.key, []).append(p)
    pieces = []
    for key, placed in by_key.items():
        location = source.locate(key)
        rows = location.shape[0]
        row_bytes = location.nbytes // rows if rows else 0
        only = placed[0] if len(placed) == 1 else None
        direct = only if (only is not None and only.straight and only.src_rows.numel() == rows
                          and only.target.dtype == location.dtype) else None
        step = max(1, chunk_bytes // max(1, row_bytes))
        for first in range(0, rows, step):
            pieces.append(Piece(key, location, first, min(rows, first + step), row_bytes, placed, direct))
    pieces.sort(key=lambda p: (str(p.location.path), p.offset))
    return pieces, rest


class StagedReader:
    """Reads pieces with a few threads into staging buffers (pinned when the model is on CUDA)
    and puts them in place on the model's device, in order."""

    def __init__(self, device: torch.device, source, buffers: int = BUFFERS, threads: int | None = None,
                 stage_everything: bool | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # one name for it: index tensors are cached by device
            self.device = torch.device("cuda", torch.cuda.current_device())
        #: Every piece through a staging buffer (always on CUDA; on the CPU, for tests of that path).
        self.stage_everything = self.cuda if stage_everything is None else stage_everything
        self.source = source
        self.buffer_count = buffers
        self.threads = max(1, min(buffers, threads or os.cpu_count() or 1))
        self._files: dict[object, int] = {}

    # -- reading ------------------------------------------------------------------------------
    def _read(self, piece: Piece, into: memoryview, wait=None) -> None:
        if wait is not None:
            wait.synchronize()  # the previous copy out of this staging buffer has finished
        fd, got = self._files[piece.location.path], 0
        while got < piece.nbytes:
            n = os.preadv(fd, [into[got:]], piece.offset + got)
            if n <= 0:
                raise CheckpointError(
                    f"{piece.location.path}: tensor {piece.key!r} rows {piece.first}..{piece.stop} need "
                    f"{piece.nbytes} bytes at offset {piece.offset}, found only {got} (truncated?)")
            got += n

    # -- placing ------------------------------------------------------------------------------
    def _direct_view(self, piece: Piece) -> torch.Tensor:
        """The parameter rows a direct piece fills, as bytes."""
        p = piece.direct
        start = int(p.dest_rows[0]) + piece.first
        return p.target[start:start + piece.stop - piece.first].reshape(-1).view(torch.uint8)

    @staticmethod
    def _place(piece: Piece, data: torch.Tensor) -> None:
        """Rows ``[first, stop)`` of the checkpoint tensor (``data``, on the model's device, as
        stored) into every placement that takes some of them."""
        cast: dict[torch.dtype, torch.Tensor] = {}
        for p in piece.placements:
            lo, hi = p.rows_within(piece.first, piece.stop)
            if lo == hi:
                continue
            if data.dtype != p.target.dtype and p.target.dtype not in cast:
                cast[p.target.dtype] = data.to(p.target.dtype)  # once per piece, on the device
            part = cast.get(p.target.dtype, data)
            if p.straight:
                s0, d0, n = int(p.src_rows[lo]) - piece.first, int(p.dest_rows[lo]), hi - lo
                p.target[d0:d0 + n].copy_(part[s0:s0 + n], non_blocking=True)
                continue
            src, dest = p.indices_on(data.device)
            rows = part if hi - lo == part.shape[0] else part.index_select(0, src[lo:hi] - piece.first)
            p.target.index_copy_(0, dest[lo:hi], rows)

    def _finish(self, piece: Piece, buffer, future, free: deque) -> None:
        future.result()
        self.source.bytes_read += piece.nbytes
        if buffer is None:  # read straight into a CPU parameter
            return
        tensor, _ = buffer
        staged = tensor[:piece.nbytes]
        shape = (piece.stop - piece.first, *piece.location.shape[1:])
        if piece.direct is not None:  # staged, then straight into the parameter
            self._direct_view(piece).copy_(staged, non_blocking=True)
        else:
            data = staged.view(piece.location.dtype).reshape(shape)
            self._place(piece, data.to(self.device, non_blocking=True) if self.cuda else data)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        free.append((tensor, event))

    def _needs_buffer(self, piece: Piece) -> bool:
        return self.stage_everything or piece.direct is None

    def run(self, pieces: list[Piece]) -> None:
        # A piece is at most chunk_bytes, or one row where a row is larger.
        size = max(piece.nbytes for piece in pieces)
        free = deque((torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda), None)
                     for _ in range(min(self.buffer_count, len(pieces))))
        pending: deque = deque()
        if self.cuda:  # index tensors on the GPU before the pipeline starts: a copy later would stall it
            for p in {id(p): p for piece in pieces for p in piece.placements if not p.straight}.values():
                p.indices_on(self.device)
        try:
            for path in {piece.location.path for piece in pieces}:  # here, not racing in the threads
                self._files[path] = os.open(path, os.O_RDONLY)
            with ThreadPoolExecutor(self.threads, thread_name_prefix="crosschip-load") as pool:
                for piece in pieces:
                    needs = self._needs_buffer(piece)
                    while pending and (len(pending) >= self.buffer_count or (needs and not free)):
                        self._finish(*pending.popleft(), free)
                    if needs:
                        buffer = free.popleft()
                        into = memoryview(buffer[0].numpy())[:piece.nbytes]
                        future = pool.submit(self._read, piece, into, buffer[1])
                    else:
                        buffer = None
                        into = memoryview(self._direct_view(piece).numpy())
                        future = pool.submit(self._read, piece, into)
                    pending.append((piece, buffer, future))
                while pending:
                    self._finish(*pending.popleft(), free)
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
        finally:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()


@torch.no_grad()
def load_placed(bindings, source) -> list:
    """Load every binding whose weights can be placed row by row (see module docstring) from a
    source that can ``locate`` its tensors' bytes; returns the others, for the transforms."""
    if not hasattr(source, "locate") or not hasattr(os, "preadv"):  # preadv: POSIX, not Windows
        return list(bindings)
    pieces, rest = plan(bindings, source, CHUNK_BYTES)
    if pieces:
        StagedReader(pieces[0].placements[0].target.device, source, BUFFERS).run(pieces)
    return rest
