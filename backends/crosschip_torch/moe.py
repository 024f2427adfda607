"""The torch backend's mixture of experts: every expert's weights stacked (``[experts, ...]``,
gate and up rows interleaved as in the dense MLP), tokens permuted into expert order on the
device (no host synchronisation), and one grouped GEMM per projection
(``torch.nn.functional.grouped_mm``) where this torch and device run it, else a loop over the
experts' token ranges."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from crosschip.weights.layouts import Chain, InterleaveRows, Rename, Stack
from crosschip.reference.moe import route
from crosschip.specs import GatedMLPSpec, MoESpec


class GroupedExperts(nn.Module):
    lora_sites = {}

    def __init__(self, spec: MoESpec, ctx=None):
        super().__init__()
        from crosschip_torch.components import GatedMLP

        self.spec = spec
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        self.router = nn.Linear(h, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        for weight in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(weight, std=0.02)
        self.act_fn = ACT2FN[spec.activation]
        if spec.shared_intermediate_size is not None:
            self.shared = GatedMLP(GatedMLPSpec(h, spec.shared_intermediate_size, spec.activation))
            self.shared_gate = nn.Linear(h, 1, bias=False) if spec.shared_gate else None
        #: Set by the parallel plan under expert parallelism: the group the experts are sharded over.
        self.ep_group = None
        self.ep_replicate_group = None  # expert parallelism with ep < dp: the ranks holding the same experts

    def forward(self, hidden: torch.Tensor):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        router_logits = self.router(x)
        weights, chosen = route(self.spec, router_logits)
        k = self.spec.top_k
        # Every (token, slot) pair in expert order; a stable sort keeps tokens in order within one.
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // k
        counts = torch.zeros(self.spec.num_experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        if self.ep_group is None:
            y = self._experts(x[tokens], counts, self.gate_up_proj, self.down_proj)
        else:
            y = self._dispatched(x[tokens], counts)
        y = y * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype))
        if self.spec.shared_intermediate_size is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out.reshape(shape), router_logits

    def _experts(self, rows, counts, gate_up_proj, down_proj):
        """The experts on ``rows`` sorted by expert, ``counts`` rows each."""
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        gate_up = _grouped(rows, gate_up_proj.transpose(1, 2), offsets)
        gate, up = gate_up.unflatten(-1, (-1, 2)).unbind(-1)
        return _grouped(self.act_fn(gate) * up, down_proj.transpose(1, 2), offsets)

    # Left out of torch.compile: the exchange needs its split sizes on the host (a graph break
    # anyway), and the experts' local shards, taken from DTensor parameters inside a graph, come
    # out as views that compiled code cannot rebuild ("as_strided not supported with DTensor").
    @torch.compiler.disable
    def _dispatched(self, rows, counts):
        """Expert parallelism: ``rows`` (sorted by expert, so grouped by the rank holding it) go
        to their experts' ranks, this rank's experts run on what arrives, and the results come
        back in the order they left (all-to-all both ways, differentiable)."""
        import torch.distributed as dist
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        group, ep = self.ep_group, dist.get_world_size(self.ep_group)
        local = self.spec.num_experts // ep
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)  # [source rank, my expert] row counts
        # The split sizes must be host integers for the exchange: one synchronisation per layer.
        send = counts.view(ep, local).sum(1).tolist()
        recv = received.view(ep, local).sum(1).tolist()
        arrived = all_to_all_single_autograd(rows, recv, send, group)
        # Arrived rows are grouped by source rank, then by expert: regroup by expert for the GEMMs.
        expert_of = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(received)
        by_expert = torch.argsort(expert_of, stable=True)
        per_expert = received.view(ep, local).sum(0)
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        y = self._experts(arrived[by_expert], per_expert, gate_up, down)
        y = torch.empty_like(y).index_copy(0, by_expert, y)  # back to arrival order
        return all_to_all_single_autograd(y, send, recv, group)


def _local(param):
    """This rank's experts: the local shard of an expert-sharded (DTensor) parameter."""
    return param.to_local() if hasattr(param, "to_local") else param


def _grouped(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of group g] @ weights[g]`` for the consecutive row groups ending at ``offsets``."""
    if grouped_mm_runs(x, weights):
        return _GROUPED_MM(x, weights, offs=offsets)
    # The loop needs the group boundaries on the host: a synchronisation, where the grouped GEMM
    # has none, but correct on every device and dtype.
    out, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ weights[g])
        start = end
    return torch.cat(out)


#: The grouped GEMM: public since torch 2.10, private before.
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_runs(x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether the grouped GEMM takes these operands here: bfloat16 on a CUDA device of compute
    capability 8.0 or later, float32 or bfloat16 on the CPU, and rows of 16-byte multiples."""
    if _GROUPED_MM is None or x.dtype != weights.dtype:
        return False
    # The CPU kernel takes float32, but the shape function torch.compile traces with (the fake
    # tensor kernel) accepts bfloat16 only: compiled float32 takes the loop.
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    if x.is_cuda:
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return ok and all(d * x.element_size() % 16 == 0 for d in (*x.shape[1:], *weights.shape[1:]))


def moe_layout(spec: MoESpec, ctx=None):
    """Canonical per-expert roles -> the stacked parameters."""
    experts = range(spec.num_experts)
    steps = [InterleaveRows(f"experts.{e}.gate.weight", f"experts.{e}.up.weight", f"experts.{e}.gate_up")
             for e in experts]
    steps += [Stack(tuple(f"experts.{e}.gate_up" for e in experts), "gate_up_proj"),
              Stack(tuple(f"experts.{e}.down.weight" for e in experts), "down_proj"),
              InterleaveRows("shared.gate.weight", "shared.up.weight", "shared.gate_up_proj.weight"),
              Rename.of(**{"shared.down.weight": "shared.down_proj.weight"})]
    return Chain.of(*steps)


def expert_mesh(dp_mesh, ep: int):
    """The data-parallel mesh as ``("ep_replicate", "ep")``: ``dp / ep`` groups of ``ep``
    consecutive data-parallel ranks, each group holding every expert once."""
    return dp_mesh._unflatten(0, (dp_mesh.size() // ep, ep), ("ep_replicate", "ep"))


def shard_experts(model, runtime, mesh) -> set:
    """Expert parallelism: each torch-built mixture's stacked experts sharded on dim 0 over the
    ``"ep"`` dim of ``mesh`` (:func:`expert_mesh`) and replicated over its ``"ep_replicate"`` dim,
    so a rank holds and computes ``num_experts / ep`` of them. Returns the expert parameters,
    which data parallelism must leave alone. Each receives, through the all-to-all's backward, the
    contributions of its ep group's ranks; :func:`average_expert_gradients` sums them over the
    replicas and divides by ``dp``, as FSDP averages the other gradients, so both are the gradient
    of the mean loss over the whole batch."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from crosschip.errors import ConfigurationError

    ep = mesh.size(1)
    experts = set()
    for path, module in model.named_modules():
        info = getattr(module, "crosschip_component", None)
        if info is None or info.component != "moe":
            continue
        if info.backend != "torch":
            raise ConfigurationError(f"ep={ep}: moe at {path} was built by backend {info.backend!r}; the torch "
                                     "backend's plan shards only its own experts")
        if info.spec.num_experts % ep:
            raise ConfigurationError(f"ep={ep} does not divide the number of experts ({info.spec.num_experts}) "
                                     f"of the moe at {path}")
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(module, name)
            sharded = nn.Parameter(distribute_tensor(param.data, mesh, [Replicate(), Shard(0)]),
                                   requires_grad=param.requires_grad)
            setattr(module, name, sharded)
            experts.add(sharded)
        module.ep_group = mesh.get_group("ep")
        module.ep_replicate_group = mesh.get_group("ep_replicate") if mesh.size(0) > 1 else None
    return experts


def average_expert_gradients(model, dp: int) -> None:
    """The hook of :func:`shard_experts`, on the final parameter objects: an expert's gradient
    summed over its replicas (the other ep groups, whose tokens it did not see) and divided by
    ``dp``."""
    import torch.distributed as dist

    def hook(group):
        def average(grad):
            if group is not None:  # in place on this rank's shard, the same on every replica
                dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)
            return grad / dp
        return average

    for module in model.modules():
        if isinstance(module, GroupedExperts) and module.ep_group is not None:
            for param in (module.gate_up_proj, module.down_proj):
                param.register_hook(hook(module.ep_replicate_group))
