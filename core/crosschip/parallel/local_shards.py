"""Modules whose parameters hold one rank's shard of a global weight as a plain tensor: layers of
libraries with their own tensor parallelism (Transformer Engine's ``tp_group`` modules,
neuronx-distributed's parallel layers), which compute on local tensors and cannot hold DTensors.

A backend declares, per component module, which parameters are shards and how (a DeviceMesh and
DTensor placements, e.g. ``Shard(0)`` for a column-parallel weight). The rest of crosschip then
sees those weights as DTensors, exactly like the torch backend's: ``state_dict()`` holds
``DTensor.from_local`` views (no copy), so saving gathers them with ``full_tensor()``, a sharded
load finds each rank's rows and columns from the placements and writes straight into the
parameter, and ``load_state_dict`` accepts DTensors (or the local shards themselves). Gradients
and optimizer state are plain local tensors too; :func:`global_views`, :func:`gradients` and
:func:`optimizer_state_views` present them the same way.

The declaration lives on the module, since parameter objects are replaced when a model is
allocated from the meta device and would lose anything set on them; :func:`mark_parameters`
copies it onto the final parameter objects, for code that sees parameters only (clipping).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

_ATTR = "_crosschip_local_shards"
_PARAM_ATTR = "crosschip_local_shard"


def declare(module: nn.Module, shards: Mapping[str, tuple]) -> None:
    """``shards``: parameter name relative to ``module`` -> ``(mesh, placements)``. Installs the
    state-dict hooks once; a later call adds to the declaration."""
    params = dict(module.named_parameters())
    unknown = [name for name in shards if name not in params]
    if unknown:
        raise KeyError(f"{type(module).__name__} has no parameter {unknown[0]!r} to declare as a shard")
    known = getattr(module, _ATTR, None)
    if known is None:
        known = {}
        setattr(module, _ATTR, known)
        module.register_state_dict_post_hook(_globalize_state_dict)
        module.register_load_state_dict_pre_hook(_localize_state_dict)
    known.update({name: (mesh, tuple(placements)) for name, (mesh, placements) in shards.items()})
    mark_parameters(module)


def mark_parameters(model: nn.Module) -> None:
    """Put every declaration under ``model`` on its current parameter object (call again once
    the model is allocated and loaded: allocation from meta replaces the objects)."""
    for module in model.modules():
        for name, shard in declared(module).items():
            setattr(module.get_parameter(name), _PARAM_ATTR, shard)


def declared(module: nn.Module) -> dict[str, tuple]:
    """Parameter name -> ``(mesh, placements)`` declared on ``module`` (empty if none)."""
    return dict(getattr(module, _ATTR, None) or {})


def as_global(tensor: torch.Tensor, mesh, placements) -> torch.Tensor:
    """A DTensor view of a local shard (shares its storage; its global shape assumes the even
    split every user of this module requires)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(tensor, mesh, placements, run_check=False)


def global_views(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` keyed by parameter names of ``module`` (its weights or their gradients), with
    the declared shards as DTensor views; everything else passes through."""
    shards = declared(module)
    return {k: as_global(v, *shards[k]) if k in shards and v is not None and not _is_dtensor(v) else v
            for k, v in tensors.items()}


def gradients(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients of ``params`` (those that have one); a marked shard's as a DTensor view that
    shares storage with ``param.grad`` (so scaling it in place scales the gradient)."""
    out = []
    for p in params:
        if p.grad is not None:
            shard = getattr(p, _PARAM_ATTR, None)
            out.append(as_global(p.grad, *shard) if shard is not None else p.grad)
    return out


def optimizer_state_views(model: nn.Module, optim_state: dict) -> dict:
    """An optimizer state dict keyed by parameter names (``torch.distributed.checkpoint.
    state_dict.get_state_dict``'s) with each declared shard's per-parameter tensors (Adam's
    moments) as DTensor views, so a distributed checkpoint saves every rank's part and loads
    each rank's part back in place. Scalars (``step``) and everything else pass through."""
    shards = {}
    for path, module in model.named_modules():
        for name, shard in declared(module).items():
            shards[f"{path}.{name}" if path else name] = (tuple(module.get_parameter(name).shape), shard)
    state = {}
    for fqn, entry in optim_state.get("state", {}).items():
        if fqn in shards:
            shape, (mesh, placements) = shards[fqn]
            entry = {k: as_global(v, mesh, placements) if torch.is_tensor(v) and tuple(v.shape) == shape else v
                     for k, v in entry.items()}
        state[fqn] = entry
    return {**optim_state, "state": state}


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def _globalize_state_dict(module, state_dict, prefix, local_metadata):
    for name, (mesh, placements) in declared(module).items():
        key = prefix + name
        if key in state_dict and not _is_dtensor(state_dict[key]):
            state_dict[key] = as_global(state_dict[key], mesh, placements)


def _localize_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs):
    for name, (mesh, placements) in declared(module).items():
        key = prefix + name
        value = state_dict.get(key)
        if value is not None and _is_dtensor(value):
            if tuple(value.placements) != placements:
                value = value.redistribute(mesh, placements)
            state_dict[key] = value.to_local()
