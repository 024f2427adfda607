"""Summing the gradients of replicated KV heads where the torch backend's weight is used (see
:mod:`crosschip.parallel.kv_replication` for the bookkeeping): an autograd function around the weight,
so it acts on whichever parameter object carries the gradient (FSDP2 gathers a new one)."""

from __future__ import annotations

import torch

from crosschip.parallel.kv_replication import KVReplicas


def sum_grads(weight, replicas: KVReplicas):
    """``weight`` unchanged, whose (DTensor) gradient's KV rows are summed over the replicas."""
    return _SumReplicaGrads.apply(weight, replicas)


class _SumReplicaGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, replicas):
        ctx.replicas = replicas
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor

        local = ctx.replicas.sum_kv_rows(grad.to_local())
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False,
                                  shape=grad.shape, stride=grad.stride()), None
