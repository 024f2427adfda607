"""Sequence parallelism of the te backend, in the layout Transformer Engine's layers expect.

TE's sequence-parallel layers gather their input and scatter their output along the *first*
dimension of the flattened ``[tokens, features]`` matrix. So between the embedding and the LM
head the residual stream is kept sequence-first and sequence-sharded, ``[seq / tp, batch,
hidden]`` (Megatron's layout): rank ``r`` holds positions ``r * seq / tp`` onwards of every
sequence. The column-parallel QKV projection and fc1 all-gather it, the row-parallel output
projection and fc2 reduce-scatter back onto it; norms and residual additions act per token.

The embedding, LM head and loss are not te's and stay replicated: the embedding's output is cut
into this rank's part of the stream (:class:`_ToStream`), the LM head's input is gathered whole
again (:class:`_FromStream`). Both sides of each cut are replicated computations, so each
backward is the matching cut (no sum over ranks: every rank already holds the whole gradient).

Weights that see only this rank's tokens get partial gradients, summed over the TP group by
:func:`partial_gradient_params`' owners: the norms on the stream (fused into TE's layers, or
standalone) and the biases added after a reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from crosschip.parallel.distributed import check_sequence_divides


class _ToStream(torch.autograd.Function):
    """``[batch, seq, hidden]`` (the same on every rank) -> this rank's ``[seq / tp, batch, hidden]``."""

    @staticmethod
    def forward(ctx, x, group):
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        check_sequence_divides(x.shape[1], tp, "te")
        ctx.group = group
        return x.transpose(0, 1).chunk(tp)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad.contiguous(), ctx.group).transpose(0, 1), None


class _FromStream(torch.autograd.Function):
    """This rank's ``[seq / tp, batch, hidden]`` -> the whole ``[batch, seq, hidden]`` on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_first(x.contiguous(), group).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        tp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.transpose(0, 1).chunk(tp)[rank].contiguous(), None


def _gather_first(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


def install(model, group) -> None:
    """Cut the stream after the embedding and join it before the LM head (found as components,
    whoever built them)."""
    for module in model.modules():
        info = getattr(module, "crosschip_component", None)
        if info is None:
            continue
        if info.component == "embedding":
            module.register_forward_hook(lambda mod, args, out: _ToStream.apply(out, group))
        elif info.component == "lm_head":
            module.register_forward_pre_hook(
                lambda mod, args: (_FromStream.apply(args[0], group), *args[1:]))


def partial_gradient_params(model, per_head_norms) -> list:
    """Parameters whose gradient each rank computes from its own tokens only: norm weights on the
    stream (TE's fused ``layer_norm_weight`` / ``layer_norm_bias`` and standalone ``rms_norm`` /
    ``layer_norm`` components, not the per-head q/k norms, which see whole sequences) and biases added after a
    reduce-scatter (a row-parallel ``bias``, LayerNormMLP's ``fc2_bias``)."""
    per_head = {id(n) for n in per_head_norms}
    out: list = []
    for module in model.modules():
        info = getattr(module, "crosschip_component", None)
        if info is not None and info.component in ("rms_norm", "layer_norm") and id(module) not in per_head:
            out.extend(module.parameters())
            continue
        if not getattr(module, "sequence_parallel", False):
            continue
        own = dict(module.named_parameters(recurse=False))
        names = ["layer_norm_weight", "layer_norm_bias", "fc2_bias"]
        if getattr(module, "parallel_mode", None) == "row":
            names.append("bias")
        out.extend(own[n] for n in names if n in own)
    return list({id(p): p for p in out}.values())
