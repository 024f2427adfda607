"""Where a backend module applies adapters: :func:`adapt`, called with the input and output of
one physical weight's matmul.

Which rows of that output belong to which Hugging Face projection follows from the backend's
registered layout (:func:`crosschip.checkpoint.sharded_load.row_sources` pushes row indices through it), and
which of them this rank holds from the weight's tensor-parallel placement. So one combined
``qkv_proj`` output gets q's, k's and v's own low-rank updates at q's, k's and v's rows,
KV-head replicas included, and no backend repeats adapter math or layout knowledge.

Tensor parallelism: the slots are whole on every rank. A column-parallel rank uses its rows of
``lora_B`` (and of DoRA's magnitude) and all of ``lora_A``; a row-parallel one its columns of
``lora_A`` with its partial input, whose low-rank product is summed over the ranks (a small
``[tokens, r]`` all-reduce). The gradients a rank gets for the parts it used are partial and
are summed over the tensor-parallel group in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SITES = "_crosschip_lora_sites"


@dataclass
class Entry:
    """One slot applied to one physical weight's output. ``positions``: where in this rank's
    output its rows are (None: all of it, in order); ``rows``: which of the slot's rows those
    are (None: all); ``cols``: this rank's columns of ``lora_A`` (None: all; set for a
    row-parallel shard, whose output the backend has already summed over ``group``)."""

    slot: object
    weight: str
    bias: str | None
    positions: torch.Tensor | None
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    group: object = None
    _on: dict = field(default_factory=dict)

    def indices(self, device):
        if device not in self._on:
            self._on[device] = tuple(None if t is None else t.to(device) for t in
                                     (self.positions, self.rows, self.cols))
        return self._on[device]


HOOKS = "_crosschip_lora_hooks"


def install(module, entries: list[Entry]) -> None:
    """Make ``module`` apply ``entries`` (a plain attribute: the slots are the adapter's
    modules, not the component's, so the component's weights and names stay the base's).

    ``module.lora_sites`` (its backend's declaration) maps each physical weight that can carry
    adapters to the submodule whose output is that weight's matmul (``""``: the module itself),
    which gets a forward hook applying them after any hook a parallel plan put there (a
    row-parallel output is summed first), or to None when the module's own forward calls
    :func:`adapt`."""
    remove(module)
    by_weight: dict[str, list[Entry]] = {}
    for entry in entries:
        by_weight.setdefault(entry.weight, []).append(entry)
    setattr(module, SITES, by_weight)
    handles = []
    for weight in by_weight:
        target = module.lora_sites[weight]
        if target is not None:
            handles.append(module.get_submodule(target).register_forward_hook(_hook(module, weight)))
    setattr(module, HOOKS, handles)


def _hook(owner, weight: str):
    def hook(submodule, args, out):
        x = args[0]
        x = x.to_local() if hasattr(x, "to_local") else x
        if not hasattr(out, "to_local"):
            return adapt(owner, weight, x, out)
        # A sequence-parallel row-parallel output, reduce-scattered onto this rank's part of the
        # sequence: the update is computed for the whole sequence and scattered the same way.
        from torch.distributed.tensor import DTensor, Shard

        from crosschip.checkpoint.sharded_load import local_region

        placements = tuple(out.placements)
        if len(placements) != 1 or not isinstance(placements[0], Shard):
            raise RuntimeError(f"{type(submodule).__name__}: a LoRA site's output is a DTensor {placements}; "
                               "only local or sequence-sharded outputs take adapters")
        dim = placements[0].dim % out.dim()
        start, stop = local_region(out)[dim]
        local = adapt(owner, weight, x, out.to_local(), sequence=(dim, start, stop))
        return DTensor.from_local(local, out.device_mesh, placements, run_check=False, shape=out.shape,
                                  stride=out.stride())

    return hook


def remove(module) -> None:
    for handle in getattr(module, HOOKS, ()):
        handle.remove()
    for attr in (SITES, HOOKS):
        if hasattr(module, attr):
            delattr(module, attr)


def has_adapters(module) -> bool:
    """Whether ``module`` applies any adapter (a backend may take another path without)."""
    return bool(getattr(module, SITES, None))


def adapt(module, weight: str, x: torch.Tensor, out: torch.Tensor, sequence=None) -> torch.Tensor:
    """``out`` (this rank's output of ``module``'s parameter ``weight`` for input ``x``, bias
    included) plus the update of every adapter on it. A no-op without adapters. ``x`` must be
    the exact input of the matmul: normalised when the module fused its input norm, and this
    rank's features of it for a row-parallel weight. ``sequence``: ``(dim, start, stop)`` when
    ``out`` is this rank's part ``start:stop`` along ``dim`` of the whole sequence ``x`` has
    (sequence parallelism's reduce-scatter)."""
    sites = getattr(module, SITES, None)
    if not sites or weight not in sites:
        return out
    for entry in sites[weight]:
        out = _apply(module, entry, x, out, sequence)
    return out


def _reduce(low, entry: Entry, cols, sequence):
    """The low-rank product of a row-parallel shard summed over the ranks (its partial
    products), cut to this rank's part of the sequence where the output is sequence-sharded."""
    if cols is not None:
        if sequence is not None:
            return _SumSlice.apply(low, entry.group, *sequence)
        low = _SumForward.apply(low, entry.group)
    if sequence is not None:
        dim, start, stop = sequence
        low = low.narrow(dim, start, stop - start)
    return low


def _apply(module, entry: Entry, x, out, sequence=None):
    slot = entry.slot
    positions, rows, cols = entry.indices(out.device)
    a, b = slot.lora_A, slot.lora_B
    if entry.group is not None:
        # Column-parallel: every rank's gradient of A and of its rows of B is partial. Row-
        # parallel: of its columns of A only (B sees the summed product, the same on all ranks).
        # Sequence-sharded outputs: B (and DoRA's magnitude) see this rank's positions only.
        a = _GradSum.apply(a, entry.group)
        b = b if cols is not None and sequence is None else _GradSum.apply(b, entry.group)
    a = a if cols is None else a.index_select(1, cols)
    b = b if rows is None else b.index_select(0, rows)
    # Float32 adapters over a 16-bit base compute in the activations' dtype (autocast's rule for
    # matmuls): casting the [r, in] and [out, r] weights is free, casting every [tokens, in]
    # input to float32 is not. Gradients reach the float32 weights through the cast.
    stored = a, b  # DoRA's row norms use the stored (float32) weights
    if x.dtype in (torch.bfloat16, torch.float16) and a.dtype != x.dtype:
        a, b = a.to(x.dtype), b.to(x.dtype)
    if entry.group is not None and cols is None:
        # A column-parallel rank's part of the input gradient (through its rows of B) is partial.
        x = _GradSum.apply(x, entry.group)
    dropped = slot.dropout(x)
    low = _reduce(F.linear(dropped.to(a.dtype), a), entry, cols, sequence)
    update = F.linear(low, b) * slot.scaling
    if slot.magnitude is None:
        update = update.to(out.dtype)
        return out + update if positions is None else out.index_add(-1, positions, update)
    return _dora(module, entry, slot, *stored, dropped, out, update, positions, rows, cols, sequence)


def _dora(module, entry, slot, a, b, dropped, out, update, positions, rows, cols, sequence=None):
    """PEFT's DoRA: ``(m / |W + s B A| - 1) * W x + m / |W + s B A| * s B A x``, the row
    norms detached (DoRA paper, section 4.3), ``W x`` taken from the base output (or
    recomputed on the dropped-out input while dropout is active, as PEFT does)."""
    weight = _local(module.get_parameter(entry.weight))
    if positions is not None:
        weight = weight.index_select(0, positions)
    with torch.no_grad():
        # In at least float32 (as PEFT: the norm of a bf16 weight plus a float32 update).
        wide = torch.promote_types(weight.dtype, torch.float32)
        merged = weight.to(wide) + slot.scaling * (b.to(wide) @ a.to(wide))
        if cols is None:
            norm = torch.linalg.norm(merged, dim=1).to(merged.dtype)
        else:
            squares = (merged * merged).sum(1)
            torch.distributed.all_reduce(squares, group=entry.group)
            norm = squares.sqrt()
    magnitude = slot.magnitude
    if entry.group is not None and (cols is None or sequence is not None):
        magnitude = _GradSum.apply(magnitude, entry.group)
    gain = (magnitude if rows is None else magnitude.index_select(0, rows)) / norm
    if slot.training and slot.config.dropout:
        base = _reduce(F.linear(dropped.to(weight.dtype), weight), entry, cols, sequence)
    else:
        base = out if positions is None else out.index_select(-1, positions)
        if entry.bias is not None:
            bias = _local(module.get_parameter(entry.bias))
            base = base - (bias if positions is None else bias.index_select(0, positions))
    change = ((gain - 1) * base + gain * update).to(out.dtype)
    return out + change if positions is None else out.index_add(-1, positions, change)


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class _GradSum(torch.autograd.Function):
    """Identity forward; the gradient summed over ``group`` (each rank's part of it)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumForward(torch.autograd.Function):
    """Summed over ``group`` forward (partial products of a row-parallel shard); identity
    backward, since every rank receives the same gradient of the summed result."""

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.contiguous().clone()
        torch.distributed.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumSlice(torch.autograd.Function):
    """Summed over ``group`` and cut to ``start:stop`` along ``dim`` (a reduce-scatter onto this
    rank's part of the sequence); backward: every rank's gradient of its part, put back in place
    and summed (an all-gather that also takes the uneven parts of a sequence tp does not divide)."""

    @staticmethod
    def forward(ctx, tensor, group, dim, start, stop):
        ctx.group, ctx.dim, ctx.start, ctx.stop, ctx.shape = group, dim, start, stop, tensor.shape
        tensor = tensor.contiguous().clone()
        torch.distributed.all_reduce(tensor, group=group)
        return tensor.narrow(dim, start, stop - start).contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full.narrow(ctx.dim, ctx.start, ctx.stop - ctx.start).copy_(grad)
        torch.distributed.all_reduce(full, group=ctx.group)
        return full, None, None, None, None
