"""The torch backend's data parallelism: FSDP2 (``fully_shard``) over the ``"dp"`` dimension of
the ``(dp, tp)`` mesh, applied after the tensor-parallel plan, as torchtitan composes them."""

from __future__ import annotations


def shard(model, parallel, dp_mesh, ignored=frozenset()) -> None:
    """FSDP2 over ``dp_mesh``: every block is one unit (its parameters are gathered for its
    forward and backward, then freed), the root holds the rest (embedding, final norm, LM head).
    Gradients are averaged over the data-parallel ranks, each of which ran its own batch.
    ``ignored``: parameters sharded otherwise (expert-parallel experts), left to their owner."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=parallel.param_dtype, reduce_dtype=parallel.reduce_dtype)
    ignored = set(ignored) or None
    for block in model.blocks():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, ignored_params=ignored)
    model.register_forward_hook(_reshard_after_inference)


def _reshard_after_inference(model, args, output) -> None:
    """FSDP2 keeps the root's parameters (embedding, final norm, LM head) gathered after its
    forward, for the backward that usually follows. After a forward without gradients
    (evaluation, generation) none follows, and ``model.parameters()`` would keep returning the
    gathered copies: an optimizer built then, or any code holding them, would update copies
    that the next gather overwrites. Shard them again at once."""
    import torch

    if not torch.is_grad_enabled():
        model.reshard()
