"""KV-head replication (tensor parallel degree beyond the KV heads): each KV head is stored once
per TP rank that needs it, and its copies must train as one weight: their gradients are summed
over the ranks holding them, and a gradient norm counts each once."""

from __future__ import annotations

import dataclasses

import torch


def replica_groups(mesh, copies: int):
    """One process group per KV head and data-parallel replica, over the TP ranks holding its
    copies (consecutive TP ranks, as :class:`crosschip.layouts.ReplicateHeads` orders them).
    Every rank creates every group, in the same order, as ``new_group`` requires."""
    import torch.distributed as dist

    rows = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist()  # one row of TP ranks per dp rank
    mine = None
    for row in rows:
        for i in range(0, len(row), copies):
            group = dist.new_group(row[i:i + copies])
            if dist.get_rank() in row[i:i + copies]:
                mine = group
    return mine


@dataclasses.dataclass(frozen=True)
class KVReplicas:
    """Where this rank's KV rows start in its QKV shard (after its query heads), and the group
    of ranks holding copies of the same KV head."""

    q_rows: int
    group: object
    rows_per_rank: int
    copies: int

    def row_copies(self, rows):
        """How many rows of the (global, physical) parameter hold the same values as each of
        ``rows``: ``copies`` for a replicated KV row, 1 for a query row. A gradient norm divides
        each row's squares by it, so a KV head counts once, as in the unreplicated model."""
        return torch.where(rows % self.rows_per_rank >= self.q_rows, self.copies, 1)

    def sum_grads(self, weight):
        """``weight`` unchanged, whose gradient's KV rows are summed over the replicas: the loss
        depends on a KV head through each copy, so the head's gradient is the sum, and every
        copy gets it and stays equal under any optimizer. Applied where the weight is used, so
        it acts on whichever parameter object carries the gradient (FSDP2 gathers a new one)."""
        return _SumReplicaGrads.apply(weight, self)


def _sum_replica_kv(grad, replicas: KVReplicas):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    local = grad.to_local().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(local[replicas.q_rows:], group=replicas.group)  # trailing rows: a contiguous view
    return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False,
                              shape=grad.shape, stride=grad.stride())


class _SumReplicaGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, replicas):
        ctx.replicas = replicas
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return _sum_replica_kv(grad, ctx.replicas), None
