"""KV-head replication, for tensor-parallel degrees beyond the number of KV heads: each KV head is
stored once per TP rank that needs it (:class:`crosschip.weights.layouts.ReplicateHeads` orders the copies
so that a dim-0 shard of the QKV projection holds whole groups), and its copies must train as one
weight: their gradients are summed over the ranks holding them, and a gradient norm counts each
once. The bookkeeping is backend-neutral; each backend's parallel plan applies the sum where its
gradients appear."""

from __future__ import annotations

import dataclasses

import torch

from crosschip.parallel.distributed import check_divides
from crosschip.errors import ConfigurationError


def kv_copies(spec, tp: int) -> int:
    """Copies of each KV head at degree ``tp`` (``spec``: any spec with ``num_heads`` and
    ``num_kv_heads``): 1 when ``tp`` divides the KV heads, ``tp / num_kv_heads`` when it is a
    multiple of them (each rank then holds one replica of one KV head with its query group)."""
    if tp == 1:
        return 1
    check_divides(tp, spec.num_heads, "number of query heads")
    if spec.num_kv_heads % tp == 0:
        return 1
    if tp % spec.num_kv_heads == 0:
        return tp // spec.num_kv_heads
    raise ConfigurationError(
        f"tensor parallel degree tp={tp} neither divides the number of KV heads "
        f"({spec.num_kv_heads}) nor is a multiple of it, so KV heads cannot be split or replicated "
        "into whole groups per rank")


def physical_qkv_spec(spec, tp: int):
    """The spec of the QKV module a backend builds: KV heads replicated where ``tp`` needs it."""
    copies = kv_copies(spec, tp)
    return spec if copies == 1 else dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads * copies)


def replica_groups(mesh, copies: int):
    """This rank's process group over the TP ranks holding copies of the same KV head
    (consecutive TP ranks, as ``ReplicateHeads`` orders them), one group per KV head and
    data-parallel replica. ``mesh``'s last dim is the TP dim. Every rank creates every group, in
    the same order, as ``new_group`` requires."""
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
    """Where this rank's KV rows start in its QKV shard (after its query heads), the rows each
    rank holds, and the group of ranks holding copies of the same KV head."""

    q_rows: int
    group: object
    rows_per_rank: int
    copies: int

    @classmethod
    def for_rank(cls, spec, tp: int, group) -> KVReplicas:
        """For the logical QKV ``spec`` at degree ``tp`` (one KV head per rank)."""
        q_rows = spec.num_heads // tp * spec.head_dim
        return cls(q_rows, group, q_rows + 2 * spec.head_dim, kv_copies(spec, tp))

    def row_copies(self, rows: torch.Tensor) -> torch.Tensor:
        """How many rows of the (global, physical) parameter hold the same values as each of
        ``rows``: ``copies`` for a replicated KV row, 1 for a query row. A gradient norm divides
        each row's squares by it, so a KV head counts once, as in the unreplicated model."""
        return torch.where(rows % self.rows_per_rank >= self.q_rows, self.copies, 1)

    def sum_kv_rows(self, local_grad: torch.Tensor) -> torch.Tensor:
        """This rank's gradient shard with its KV rows summed over the replicas: the loss depends
        on a KV head through each copy, so the head's gradient is the sum, and every copy gets
        it and stays equal under any optimizer. Returns a new tensor."""
        import torch.distributed as dist

        local = local_grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(local[self.q_rows:], group=self.group)  # trailing rows: a contiguous view
        return local
