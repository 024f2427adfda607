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
    ``clip_grad_norm_`` cannot mix: :class:`GradientSquares` sums them. Without DTensor
    gradients, torch's ``clip_grad_norm_``."""
    params = [p for p in params if p.grad is not None]
    grads = local_shards.gradients(params)  # a backend's local shards as DTensor views
    if not any(hasattr(g, "device_mesh") for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    squares = GradientSquares()
    squares.add(params)
    norm = squares.norm()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:  # a shard scaled in place through its local view: no host sync per gradient
        (g.to_local() if hasattr(g, "device_mesh") else g).mul_(scale.to(g.dtype))
    return norm


class GradientSquares:
    """The total 2-norm of gradients over any parallel layout, added a few at a time (the
    optimizer stepping in backward adds each gradient before its step frees it). Each
    gradient's local squares are summed over the whole mesh and divided by the number of ranks
    holding the same values (the product of its replicated dims); a plain gradient counts once.
    A parameter whose rows replicate one another (KV heads copied where tp exceeds them)
    carries ``crosschip_row_copies(global_rows) -> copies``, and each row counts once."""

    def __init__(self):
        self._plain: list[torch.Tensor] = []
        self._by_mesh: dict = {}

    def add(self, params) -> None:
        """Add the squares of the gradients ``params`` hold now (no host sync)."""
        from torch.distributed.tensor import Replicate

        params = [p for p in params if p.grad is not None]
        for p, g in zip(params, local_shards.gradients(params)):
            if not hasattr(g, "device_mesh"):
                self._plain.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())
                continue
            copies = 1
            for dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate):
                    copies *= g.device_mesh.size(dim)
            self._by_mesh.setdefault(g.device_mesh, []).append(
                _squares(g, getattr(p, "crosschip_row_copies", None)) / copies)

    def norm(self) -> torch.Tensor:
        """The total norm of everything added (collective over each mesh added from: every rank
        calls it), as a 0-dim float32 tensor; then empty again."""
        import torch.distributed as dist

        parts = list(self._plain)
        for mesh, squares in self._by_mesh.items():
            part = torch.stack(squares).sum()
            for dim in range(mesh.ndim):  # summed along each dim in turn: over every rank of the mesh
                dist.all_reduce(part, group=mesh.get_group(dim))
            parts.append(part)
        self._plain, self._by_mesh = [], {}
        if not parts:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack([p.to(parts[0].device) for p in parts]).sum().sqrt()


def _squares(grad, row_copies) -> torch.Tensor:
    """Sum of squares of this rank's part of ``grad``, each row divided by its number of copies."""
    local = grad.to_local().float()
    if row_copies is None:
        return local.pow(2).sum()
    from crosschip.checkpoint.sharded_load import local_region

    (start, stop), *_ = local_region(grad)
    per_row = local.pow(2).reshape(local.shape[0], -1).sum(dim=1)
    return (per_row / row_copies(torch.arange(start, stop, device=per_row.device))).sum()
