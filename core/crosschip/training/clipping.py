"""Gradient clipping over any parallel layout: DTensor gradients on a ``(dp, tp)`` mesh, a
backend's local shards (declared through :mod:`crosschip.parallel.local_shards`), plain replicated
gradients, and rows that replicate one another (KV heads copied where tp exceeds them)."""

from __future__ import annotations

import torch

from crosschip.parallel import local_shards


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Scale gradients to a total 2-norm of at most ``max_norm``. Under tensor or data
    parallelism gradients are DTensors on a ``(dp, tp)`` mesh, sharded on some of its dims and
    replicated on others, possibly beside plain replicated tensors, which torch's
    ``clip_grad_norm_`` cannot mix. Each gradient's local squares are summed over the whole mesh
    and divided by the number of ranks holding the same values (the product of its replicated
    dims); a plain gradient counts once. A parameter whose rows replicate one another (KV heads
    copied where tp exceeds them) carries ``crosschip_row_copies(global_rows) -> copies``, and
    each row counts once."""
    params = [p for p in params if p.grad is not None]
    grads = local_shards.gradients(params)  # a backend's local shards as DTensor views
    copies_of = {id(g): p.crosschip_row_copies for p, g in zip(params, grads)
                 if hasattr(p, "crosschip_row_copies")}
    sharded = [g for g in grads if hasattr(g, "device_mesh")]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    plain = [g for g in grads if not hasattr(g, "device_mesh")]
    total = torch.zeros((), dtype=torch.float32, device=sharded[0].to_local().device)
    for g in plain:
        total += g.float().pow(2).sum()
    by_mesh: dict = {}
    for g in sharded:
        copies = 1
        for dim, placement in enumerate(g.placements):
            if isinstance(placement, Replicate):
                copies *= g.device_mesh.size(dim)
        by_mesh.setdefault(g.device_mesh, []).append(_squares(g, copies_of.get(id(g))) / copies)
    for mesh, squares in by_mesh.items():
        part = torch.stack(squares).sum()
        for dim in range(mesh.ndim):  # summed along each dim in turn: over every rank of the mesh
            dist.all_reduce(part, group=mesh.get_group(dim))
        total += part
    norm = total.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:  # a shard scaled in place through its local view: no host sync per gradient
        (g.to_local() if hasattr(g, "device_mesh") else g).mul_(scale.to(g.dtype))
    return norm


def _squares(grad, row_copies) -> torch.Tensor:
    """Sum of squares of this rank's part of ``grad``, each row divided by its number of copies."""
    local = grad.to_local().float()
    if row_copies is None:
        return local.pow(2).sum()
    from crosschip.checkpoint.sharded_load import local_region

    (start, stop), *_ = local_region(grad)
    per_row = local.pow(2).reshape(local.shape[0], -1).sum(dim=1)
    return (per_row / row_copies(torch.arange(start, stop, device=per_row.device))).sum()
