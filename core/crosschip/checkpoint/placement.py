"""Where each row of a checkpoint tensor lands in a component's physical tensors, computed once
from the layout transforms (by pushing row indices through them, :func:`row_sources`), so a
loader can copy checkpoint bytes straight into place instead of running the transforms on
values: a QKV group interleave or a gate/up row interleave becomes one indexed copy per
checkpoint tensor, done on the device that holds the model.

Only whole (unsharded) plain-tensor targets are planned here; a sharded component keeps the
row-run reads of :mod:`crosschip.checkpoint.sharded_load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crosschip.checkpoint.sharded_load import _KEY_SHIFT, row_sources


@dataclass
class Placement:
    """Rows ``src_rows`` (sorted) of checkpoint tensor ``key`` go to rows ``dest_rows`` of
    ``target`` (a contiguous tensor: the module's own storage). ``straight``: both are one run of
    consecutive rows, so a slice copy does it."""

    key: str
    target: torch.Tensor
    src_rows: torch.Tensor  # int64, on the CPU
    dest_rows: torch.Tensor  # int64, on the CPU
    straight: bool
    _on_device: dict = field(default_factory=dict, repr=False)

    def rows_within(self, first: int, stop: int) -> tuple[int, int]:
        """``(lo, hi)``: the entries of this placement whose source row is in ``[first, stop)``."""
        bounds = torch.searchsorted(self.src_rows, torch.tensor([first, stop], dtype=torch.int64))
        return int(bounds[0]), int(bounds[1])

    def indices_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src_rows, dest_rows)`` on ``device``, copied there once."""
        found = self._on_device.get(device)
        if found is None:
            found = self._on_device[device] = (self.src_rows.to(device), self.dest_rows.to(device))
        return found


def _is_run(rows: torch.Tensor) -> bool:
    """One run of consecutive ascending rows."""
    return rows.numel() == 1 or (rows.numel() > 1 and bool((rows.diff() == 1).all()))


def plain_targets(binding) -> dict[str, torch.Tensor] | None:
    """The module's weights by physical name, or None if any is not a plain contiguous tensor
    (a DTensor, a local shard, a quantised tensor subclass): those load through the transforms."""
    targets = {k: v for k, v in binding.module.state_dict().items() if not k.endswith("_extra_state")}
    for tensor in targets.values():
        if type(tensor) is not torch.Tensor or not tensor.is_contiguous() or tensor.dim() == 0:
            return None
    return targets


#: Row maps by component structure: every layer of a model has the same, so it is worked out once.
_ROW_MAPS: dict = {}


def _row_map(binding, targets) -> list[tuple[str, int, torch.Tensor, torch.Tensor, bool]] | None:
    """``(physical name, key index, src_rows, dest_rows, straight)`` for ``binding``, or None."""
    sources = row_sources(binding)
    if sources is None or set(sources) != set(targets):
        return None
    keys = list(binding.hf_shapes)
    out = []
    for name, target in targets.items():
        ids = sources[name]
        if ids.numel() != target.shape[0]:
            return None
        key_ids, rows = ids >> _KEY_SHIFT, ids & ((1 << _KEY_SHIFT) - 1)
        for key_id in key_ids.unique().tolist():
            if tuple(binding.hf_shapes[keys[key_id]][1:]) != tuple(target.shape[1:]):
                return None  # columns are not carried over unchanged
            dest = (key_ids == key_id).nonzero().reshape(-1)
            src = rows[dest]
            order = torch.argsort(src, stable=True)
            src, dest = src[order], dest[order]
            out.append((name, key_id, src, dest, _is_run(src) and _is_run(dest)))
    return out


def placements(binding) -> list[Placement] | None:
    """Every checkpoint key's placements into ``binding``'s module, or None when the component's
    transforms are not a pure row permutation (then its tensors go through the transforms)."""
    targets = plain_targets(binding)
    if targets is None:
        return None
    # The row map depends on the transforms, the keys' order and shapes and the targets' shapes,
    # not on the keys' names (a layer's index) or the values.
    structure = (binding.transform, binding.checkpoint_transform, tuple(binding.names),
                 tuple(binding.hf_shapes.values()),
                 tuple((name, tuple(t.shape)) for name, t in targets.items()))
    if len(_ROW_MAPS) > 256:  # a bound, for processes that load many different models
        _ROW_MAPS.clear()
    try:
        row_map = _ROW_MAPS[structure] if structure in _ROW_MAPS else _ROW_MAPS.setdefault(
            structure, _row_map(binding, targets))
    except TypeError:  # a transform that cannot be hashed: work it out for this binding alone
        row_map = _row_map(binding, targets)
    if row_map is None:
        return None
    keys = list(binding.hf_shapes)
    return [Placement(keys[key_id], targets[name], src, dest, straight)
            for name, key_id, src, dest, straight in row_map]
