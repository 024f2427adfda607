"""Loading a sharded (DTensor) model: each rank reads from the checkpoint only the rows and
columns of each weight that its shard holds (safetensors ``get_slice``), never a full copy.

Every transform in the layout vocabulary moves whole rows (renames, concatenations, QKV group and
gate/up interleaves, KV-head replication). So pushing a tensor of *row indices* through a
component's transforms tells, for every physical row, which checkpoint key and row it comes from;
a rank's shard is then a list of row runs to read. A transform that mixes values within rows
would not preserve the index tensors' shape; such a component falls back to reading whole tensors.
"""

from __future__ import annotations

import torch

_KEY_SHIFT = 32
#: Largest piece read at once: bounds the temporary memory of a load.
CHUNK_BYTES = 16 * 2**20


def row_sources(binding) -> dict[str, torch.Tensor] | None:
    """Physical name -> int64 ``key_id << 32 | row`` per physical row, or None if a transform
    of this component is not a pure row permutation."""
    keys = list(binding.hf_shapes)
    index = {}
    for key_id, key in enumerate(keys):
        shape = binding.hf_shapes[key]
        rows = torch.arange(shape[0], dtype=torch.int64) + (key_id << _KEY_SHIFT)
        index[key] = rows.reshape(shape[0], *([1] * (len(shape) - 1)))
    try:
        physical = binding.from_hf(index)
    except Exception:  # a transform that needs real values or shapes: read whole tensors instead
        return None
    rows_of = torch.tensor([binding.hf_shapes[key][0] for key in keys])
    out = {}
    for name, tensor in physical.items():
        if tensor.dtype != torch.int64 or tensor.dim() == 0 or any(d != 1 for d in tensor.shape[1:]):
            return None
        flat = tensor.reshape(-1)
        key_id, row = flat >> _KEY_SHIFT, flat & ((1 << _KEY_SHIFT) - 1)
        # A transform that changed values while keeping the shape (a scale, an offset) leaves
        # ids that name no checkpoint row: read whole tensors rather than wrong rows.
        if flat.numel() and (key_id.min() < 0 or key_id.max() >= len(keys) or (row >= rows_of[key_id]).any()):
            return None
        out[name] = flat
    return out


def local_region(tensor) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per dim of this rank's part of ``tensor`` (all of a plain tensor)."""
    if not hasattr(tensor, "device_mesh"):
        return tuple((0, d) for d in tensor.shape)
    # The same computation DTensor and torch.distributed.checkpoint use to place a shard.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple((o, o + s) for o, s in zip(offset, shape))


def _runs(rows: torch.Tensor):
    """Consecutive rows of one key as ``(key_id, start, stop)``."""
    values = rows.tolist()
    i = 0
    while i < len(values):
        key_id, start = values[i] >> _KEY_SHIFT, values[i] & ((1 << _KEY_SHIFT) - 1)
        j = i + 1
        while j < len(values) and values[j] == values[j - 1] + 1 and values[j] >> _KEY_SHIFT == key_id:
            j += 1
        yield key_id, start, start + (j - i)
        i = j


@torch.no_grad()
def load_local(binding, source) -> bool:
    """Fill ``binding``'s module, reading only this rank's part of every weight. Returns False
    (nothing written) when the component's transforms cannot be followed row by row."""
    targets = {k: v for k, v in binding.module.state_dict().items() if not k.endswith("_extra_state")}
    sources = row_sources(binding)
    if sources is None or set(sources) != set(targets):
        return False
    keys = list(binding.hf_shapes)
    plan = []
    for name, target in targets.items():
        region = local_region(target)
        runs = list(_runs(sources[name][region[0][0]:region[0][1]]))
        if any(tuple(binding.hf_shapes[keys[k]][1:]) != tuple(target.shape[1:]) for k, _, _ in runs):
            return False  # columns are not carried over unchanged: not a row permutation
        plan.append((target, runs, tuple(slice(a, b) for a, b in region[1:])))
    for target, runs, columns in plan:
        dest = target.to_local() if hasattr(target, "device_mesh") else target
        rows_view = dest.reshape(dest.shape[0], -1) if dest.dim() > 1 else dest  # a view: contiguous
        step = max(1, CHUNK_BYTES // max(1, rows_view[:1].numel() * dest.element_size()))
        offset = 0
        for key_id, start, stop in runs:
            # Bounded pieces copied straight into place: no whole-shard temporary.
            for first in range(start, stop, step):
                last = min(stop, first + step)
                into = rows_view[offset:offset + last - first]
                into.copy_(source.get_slice(keys[key_id], (slice(first, last), *columns)).reshape(into.shape))
                offset += last - first
    return True
