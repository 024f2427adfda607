"""Loading a sharded (DTensor) model: each rank reads from the checkpoint only the rows and
columns of each weight that its shard holds (safetensors ``get_slice``), never a full copy.

Almost every transform in the layout vocabulary moves whole rows (renames, concatenations, QKV
group and gate/up interleaves, KV-head replication). So pushing a tensor of *row indices* through a
component's transforms tells, for every physical row, which checkpoint key and row it comes from;
a rank's shard is then a list of row runs to read. A component whose transforms reorder columns
instead (the input heads of a row-parallel projection, following permuted query heads) gets the
same treatment with *column indices*. A transform that mixes values within rows would not
preserve the index tensors' shape; such a component falls back to reading whole tensors.
"""

from __future__ import annotations

import torch

_KEY_SHIFT = 32
#: Largest piece read at once: bounds the temporary memory of a load.
CHUNK_BYTES = 16 * 2**20


def row_sources(binding) -> dict[str, torch.Tensor] | None:
    """Physical name -> int64 ``key_id << 32 | row`` per physical row, or None if a transform
    of this component is not a pure row permutation (or stacks rows under a new leading dim)."""
    ids = leading_row_sources(binding)
    if ids is None or any(t.dim() != 1 for t in ids.values()):
        return None
    return ids


def leading_row_sources(binding) -> dict[str, torch.Tensor] | None:
    """Like :func:`row_sources`, but a physical tensor may hold checkpoint rows under more than
    one leading dim (a mixture of experts' ``[experts, rows, ...]`` stack): its ids come shaped as
    those leading dims, so a shard of the first (an expert-parallel rank's experts) maps to rows."""
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
        if tensor.dtype != torch.int64 or tensor.dim() == 0:
            return None
        flat = tensor.reshape(-1)
        key_id, row = flat >> _KEY_SHIFT, flat & ((1 << _KEY_SHIFT) - 1)
        # A transform that changed values while keeping the shape (a scale, an offset) leaves
        # ids that name no checkpoint row: read whole tensors rather than wrong rows.
        if flat.numel() and (key_id.min() < 0 or key_id.max() >= len(keys) or (row >= rows_of[key_id]).any()):
            return None
        ndims = {len(binding.hf_shapes[keys[k]]) for k in key_id.unique().tolist()}
        if len(ndims) > 1:
            return None  # rows of matrices and of vectors mixed in one tensor
        lead = tensor.dim() - (ndims.pop() - 1) if flat.numel() else 1
        if lead < 1 or any(d != 1 for d in tensor.shape[lead:]):
            return None
        out[name] = tensor.reshape(tensor.shape[:lead])
    return out


def column_sources(binding) -> dict[str, tuple[torch.Tensor, bool]] | None:
    """Physical name -> ``(ids, by_column)``: for a matrix whose rows the transforms leave alone,
    int64 ``key_id << 32 | column`` per physical column (``by_column``); for a vector, its row
    ids as :func:`row_sources` gives them. None if the transforms do more than reorder columns."""
    keys = list(binding.hf_shapes)
    index = {}
    for key_id, key in enumerate(keys):
        shape = binding.hf_shapes[key]
        size = shape[1] if len(shape) == 2 else shape[0]
        ids = torch.arange(size, dtype=torch.int64) + (key_id << _KEY_SHIFT)
        index[key] = ids.reshape(1, size) if len(shape) == 2 else ids
    try:
        physical = binding.from_hf(index)
    except Exception:
        return None
    out = {}
    for name, tensor in physical.items():
        if tensor.dtype != torch.int64 or tensor.dim() not in (1, 2) or (tensor.dim() == 2 and tensor.shape[0] != 1):
            return None
        flat = tensor.reshape(-1)
        key_id, pos = flat >> _KEY_SHIFT, flat & ((1 << _KEY_SHIFT) - 1)
        if flat.numel() and (key_id.min() < 0 or key_id.max() >= len(keys)):
            return None
        shapes = [binding.hf_shapes[keys[k]] for k in key_id.unique().tolist()]
        if any(len(shape) != tensor.dim() for shape in shapes):
            return None  # a matrix made from vectors or the other way round
        limit = torch.tensor([binding.hf_shapes[k][-1 if tensor.dim() == 2 else 0] for k in keys])
        if flat.numel() and (pos >= limit[key_id]).any():
            return None
        out[name] = (flat, tensor.dim() == 2)
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
    (nothing written) when the component's transforms cannot be followed row by row or column
    by column."""
    targets = {k: v for k, v in binding.module.state_dict().items() if not k.endswith("_extra_state")}
    sources = leading_row_sources(binding)
    if sources is None or set(sources) != set(targets):
        columns = column_sources(binding)
        if columns is None or set(columns) != set(targets):
            return False
        return _load_by_columns(binding, source, targets, columns)
    keys = list(binding.hf_shapes)
    plan = []
    for name, target in targets.items():
        ids, region = sources[name], local_region(target)
        lead = ids.dim()  # 1, or 2 for [experts, rows, ...]: this rank's experts, every row
        runs = list(_runs(ids[tuple(slice(a, b) for a, b in region[:lead])].reshape(-1)))
        if any(tuple(binding.hf_shapes[keys[k]][1:]) != tuple(target.shape[lead:]) for k, _, _ in runs):
            return False  # columns are not carried over unchanged: not a row permutation
        plan.append((target, lead, runs, tuple(slice(a, b) for a, b in region[lead:])))
    for target, lead, runs, columns in plan:
        dest = target.to_local() if hasattr(target, "device_mesh") else target
        rows = dest.shape[:lead].numel()
        # A view (contiguous); the width spelled out, since a rank's shard may hold no rows.
        rows_view = dest.reshape(rows, dest.shape[lead:].numel()) if dest.dim() > lead else dest.reshape(rows)
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


def _load_by_columns(binding, source, targets, columns) -> bool:
    """:func:`load_local` for transforms that reorder the columns of matrices (rows unchanged):
    each rank reads its rows and, run by run, the checkpoint columns its physical columns hold."""
    keys = list(binding.hf_shapes)
    plan = []
    for name, target in targets.items():
        ids, by_column = columns[name]
        region = local_region(target)
        if not by_column:  # a vector: its row runs, as in the row-wise load
            plan.append((target, list(_runs(ids[region[0][0]:region[0][1]])), None))
            continue
        (r0, r1), (c0, c1) = region
        runs = list(_runs(ids[c0:c1]))
        if any(binding.hf_shapes[keys[k]][0] != target.shape[0] for k, _, _ in runs):
            return False  # rows are not carried over unchanged
        plan.append((target, runs, (r0, r1)))
    for target, runs, rows in plan:
        dest = target.to_local() if hasattr(target, "device_mesh") else target
        offset = 0
        if rows is None:
            for key_id, start, stop in runs:
                dest[offset:offset + stop - start].copy_(source.get_slice(keys[key_id], (slice(start, stop),)))
                offset += stop - start
            continue
        for key_id, start, stop in runs:
            width = stop - start
            step = max(1, CHUNK_BYTES // max(1, width * dest.element_size()))
            for first in range(rows[0], rows[1], step):
                last = min(rows[1], first + step)
                piece = source.get_slice(keys[key_id], (slice(first, last), slice(start, stop)))
                dest[first - rows[0]:last - rows[0], offset:offset + width].copy_(piece)
            offset += width
    return True
