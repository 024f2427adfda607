"""The stand-in ``torch_xla.core.xla_model`` of NxD's CPU mode (see :mod:`crosschip_neuron.cpu_mode`):
reduce-op constants, a no-op ``mark_step``, and the three collectives NxD's GQA layer calls on
``xm`` directly, routed to the gloo group NxD built for the replica groups they name.

The collectives return new tensors (XLA's are functional) rather than reducing their input in
place: the GQA backward passes the incoming K/V output gradients, which autograd owns."""

from __future__ import annotations

REDUCE_SUM = "sum"
REDUCE_MAX = "max"
REDUCE_MIN = "min"

#: (replica-groups global, process-group global) pairs of ``parallel_state`` an ``xm`` call may name.
_GROUPS = (
    ("_TENSOR_MODEL_PARALLEL_GROUP_SPMD", "_TENSOR_MODEL_PARALLEL_GROUP"),
    ("_KV_SHARED_GROUP_SPMD", "_KV_SHARED_GROUP"),
    ("_DATA_PARALLEL_GROUP_SPMD", "_DATA_PARALLEL_GROUP"),
    ("_WORLD_GROUP_SPMD", "_WORLD_GROUP"),
)


def xla_model_namespace() -> dict:
    return {"REDUCE_SUM": REDUCE_SUM, "REDUCE_MAX": REDUCE_MAX, "REDUCE_MIN": REDUCE_MIN,
            "mark_step": mark_step, "all_reduce": all_reduce, "all_gather": all_gather,
            "reduce_scatter": reduce_scatter, "master_print": print}


def mark_step(*args, **kwargs) -> None:
    """Nothing is traced on CPU: there is no graph to cut."""


def process_group(groups):
    """The gloo process group NxD created for ``groups`` (a list of rank lists, as NxD passes to
    XLA collectives), or a ProcessGroup passed as it is."""
    if groups is None or not isinstance(groups, (list, tuple)):
        return groups
    from neuronx_distributed.parallel_layers import parallel_state
    from neuronx_distributed.utils import cpu_mode

    if not cpu_mode():
        raise RuntimeError("an XLA collective was called without the Neuron SDK and without NxD's CPU mode "
                           "(NXD_CPU_MODE=1): there is no device to run it on")
    wanted = [list(g) for g in groups]
    for spmd_name, group_name in _GROUPS:
        if getattr(parallel_state, spmd_name, None) == wanted:
            return getattr(parallel_state, group_name)
    raise RuntimeError(f"no NxD process group matches the replica groups {wanted}")


def all_reduce(reduce_type, inputs, scale: float = 1.0, groups=None, pin_layout: bool = True, **_):
    from neuronx_distributed.parallel_layers import comm

    single = not isinstance(inputs, (list, tuple))
    tensors = [t.clone() for t in ([inputs] if single else inputs)]
    comm.all_reduce(reduce_type, tensors, groups=process_group(groups))
    if scale != 1.0:
        tensors = [t * scale for t in tensors]
    return tensors[0] if single else tensors


def all_gather(value, dim: int = 0, groups=None, output=None, pin_layout: bool = True, **_):
    from neuronx_distributed.parallel_layers import comm

    return comm.all_gather(value.contiguous(), dim=dim, groups=process_group(groups), output=output)


def reduce_scatter(reduce_type, value, scale, scatter_dim, shard_count, groups=None, output=None,
                   pin_layout: bool = True, **_):
    import torch
    from neuronx_distributed.parallel_layers import comm

    group = process_group(groups)
    if output is None:  # NxD's CPU branch fills ``output`` and returns None without one
        shape = list(value.shape)
        shape[scatter_dim] //= shard_count
        output = torch.empty(shape, dtype=value.dtype, device=value.device)
    comm.reduce_scatter(reduce_type, value.contiguous(), scale, scatter_dim, shard_count, groups=group,
                        output=output)
    return output
