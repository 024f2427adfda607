"""The state-dict adapter: moves weights between a model's physical layout (whatever each
backend's modules hold) and the canonical Hugging Face layout, component by component, one
component's tensors in flight at a time.

Three names for a weight:
- its *role* in the component (``q.weight``), the same for every backend and model;
- its *physical* name in the module (``weight`` of the torch backend's combined QKV), reached from
  roles through the layout the module's backend registered;
- its *Hugging Face key* (``model.layers.0.self_attn.q_proj.weight``), reached from roles through
  the model's checkpoint transform (identity unless the checkpoint itself fuses tensors, as
  Phi-3's does) and its name prefixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch import nn

from crosschip.parallel import local_shards
from crosschip.errors import CheckpointError
from crosschip.weights.layouts import IDENTITY, Transform, canonical_shapes
from crosschip.plugins.descriptors import resolve_callable
from crosschip.runtime import BuildContext, ComponentInfo


@dataclass(frozen=True)
class Binding:
    """One component of a model and where its weights live in a Hugging Face checkpoint."""

    path: str
    module: nn.Module
    info: ComponentInfo
    transform: Transform  # roles -> physical names (the backend's layout)
    checkpoint_transform: Transform  # roles -> checkpoint-local names (the model's)
    names: dict[str, str]  # checkpoint-local name -> Hugging Face key
    hf_shapes: dict[str, tuple[int, ...]]  # Hugging Face key -> shape

    def to_hf(self, physical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        local = self.checkpoint_transform.apply(self.transform.invert(physical))
        return {self.names[k]: v for k, v in local.items()}

    def from_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        by_key = {key: local for local, key in self.names.items()}
        roles = self.checkpoint_transform.invert({by_key[k]: v for k, v in tensors.items()})
        return self.transform.apply(roles)


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...
    def get_slice(self, key: str, index: tuple) -> torch.Tensor: ...
    def describe(self, key: str) -> str: ...
    # Optional: ``dtype(key) -> torch.dtype`` without reading the tensor, checked before loading.


def _hf_name(path: str, local: str, prefixes: dict[str, str]) -> str:
    head, _, tail = local.partition(".")
    if tail and head in prefixes:
        return f"{prefixes[head]}.{tail}"
    return f"{prefixes.get('', path)}.{local}"


def _shapes_through(transform: Transform, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes after a transform, computed on meta tensors (no memory touched)."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in transform.apply(meta).items()}


def bindings(model: nn.Module) -> list[Binding]:
    """Every component of ``model`` with its layout transform and Hugging Face names."""
    runtime = model.runtime
    name_map = model.checkpoint_names()
    found: list[Binding] = []
    owners: dict[int, str] = {}
    for path, module in model.named_modules():
        info: ComponentInfo | None = getattr(module, "crosschip_component", None)
        if info is None:
            continue
        for inner, sub in module.named_modules():
            if inner and getattr(sub, "crosschip_component", None) is not None:
                raise TypeError(f"component {path} contains component {path}.{inner}; components "
                                "must not nest, since each owns its weights' canonical names")
        layout = runtime.registry.layouts.get((info.backend, info.component))
        ctx = BuildContext(runtime, info.component, info.backend)
        transform = resolve_callable(layout.transform)(info.spec, ctx) if layout else IDENTITY
        shapes = canonical_shapes(info.component, info.spec, info.fuses_input_norm, runtime.registry)
        checkpoint_transform = model.checkpoint_transform(path, info)
        local_shapes = _shapes_through(checkpoint_transform, shapes)
        prefixes = name_map.get(path, {})
        names = {local: _hf_name(path, local, prefixes) for local in local_shapes}
        hf_shapes = {names[k]: s for k, s in local_shapes.items()}
        found.append(Binding(path, module, info, transform, checkpoint_transform, names, hf_shapes))
        for p in module.parameters():
            owners[id(p)] = path
    for module in model.modules():  # an adapter's parameters have no place in the base checkpoint
        if getattr(module, "is_crosschip_adapter", False):
            owners.update((id(p), "adapter") for p in module.parameters())
    strays = [n for n, p in model.named_parameters() if id(p) not in owners]
    if strays:
        raise TypeError(f"parameters outside any component cannot be mapped to a checkpoint: {strays}")
    return found


EXTRA_STATE = "_extra_state"


def whole(tensor):
    """A distributed (DTensor) tensor gathered whole, differentiably (layouts and the canonical
    form are global; logits a parallel plan left sharded); plain tensors pass through. A
    collective: every rank of the mesh must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like(target, tensor: torch.Tensor):
    """``tensor`` (whole) placed as ``target`` is: cast, and sharded like a DTensor target."""
    if not torch.is_tensor(target):
        return tensor
    tensor = tensor.to(dtype=target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the same whole tensor (read from the checkpoint or initialised from
        # one seed): each keeps its own part, no rank sends anything (src_data_rank=None).
        tensor = distribute_tensor(tensor.to(target.device), target.device_mesh, target.placements,
                                   src_data_rank=None)
    return tensor


def _physical(binding: Binding, grads: bool) -> dict[str, torch.Tensor]:
    if grads:
        local = {n: p.grad for n, p in binding.module.named_parameters() if p.grad is not None}
        return {n: whole(g) for n, g in local_shards.global_views(binding.module, local).items()}
    # Extra state (Transformer Engine's FP8 scaling metadata) is runtime state of the module,
    # not a weight: it has no Hugging Face counterpart.
    return {k: whole(v) for k, v in binding.module.state_dict().items() if not k.endswith(EXTRA_STATE)}


def _load_physical(binding: Binding, physical: dict[str, torch.Tensor]) -> None:
    targets = binding.module.state_dict()
    merged = {k: v for k, v in targets.items() if k.endswith(EXTRA_STATE)}  # keep the module's own
    for k, v in physical.items():
        merged[k] = _like(targets[k], v) if k in targets else v
    binding.module.load_state_dict(merged, strict=True)


def iter_canonical(model: nn.Module, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_key, tensor)`` for every canonical weight (or its gradient), one component at a time,
    in the order of :func:`canonical_sizes`."""
    for b in bindings(model):
        tensors = b.to_hf(_physical(b, grads))
        if not grads and set(tensors) != set(b.hf_shapes):
            raise RuntimeError(
                f"layout of backend {b.info.backend!r} for {b.info.component} at {b.path} gives "
                f"keys {sorted(tensors)}, expected {sorted(b.hf_shapes)}"
            )
        for key, shape in b.hf_shapes.items():  # a fixed order: writers plan shards from shapes alone
            if key in tensors:
                if tuple(tensors[key].shape) != tuple(shape):  # a layout whose inverse is wrong, never saved
                    raise RuntimeError(
                        f"layout of backend {b.info.backend!r} for {b.info.component} at {b.path} gives {key!r} "
                        f"the shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
                yield key, tensors[key]


def canonical_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """All canonical weights (or gradients) by Hugging Face key."""
    return dict(iter_canonical(model, grads))


def canonical_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """``(hf_key, bytes)`` in :func:`iter_canonical` order, without materialising any tensor."""
    out = []
    for b in bindings(model):
        itemsize = next((p.element_size() for p in b.module.parameters()), 4)
        for key, shape in b.hf_shapes.items():
            out.append((key, itemsize * math.prod(shape)))
    return out


def check_source(model: nn.Module, source: TensorSource, ignored: set[str] = frozenset()) -> list[Binding]:
    """Strict key, shape and dtype check of a checkpoint against the model, before reading any
    tensor. Floating-point weights convert to the model's dtype; an integer or bool tensor is
    refused, since casting it would load numbers that were never weights."""
    found = bindings(model)
    available = set(source.keys())
    expected = {key: shape for b in found for key, shape in b.hf_shapes.items()}
    model_dtype = {key: _dtype_of(b.module) for b in found for key in b.hf_shapes}
    stored_dtype = getattr(source, "dtype", None)
    problems = []
    for key, shape in expected.items():
        if key not in available:
            problems.append(f"missing key {key!r} (expected shape {list(shape)})")
            continue
        if tuple(source.shape(key)) != tuple(shape):
            problems.append(f"key {key!r} in {source.describe(key)} has shape "
                            f"{list(source.shape(key))}, expected {list(shape)}")
        dtype = stored_dtype(key) if stored_dtype is not None else None
        if dtype is not None and not dtype.is_floating_point:
            problems.append(f"key {key!r} in {source.describe(key)} has dtype {dtype}, expected a "
                            f"floating-point dtype (the model's {model_dtype[key]})")
    unexpected = sorted(available - set(expected) - set(ignored))
    problems += [f"unexpected key {k!r} in {source.describe(k)}" for k in unexpected]
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return found


@torch.no_grad()
def load_canonical(model: nn.Module, source: TensorSource, ignored: set[str] = frozenset()) -> None:
    """Fill ``model`` from canonical tensors. A whole component whose layout moves whole rows has
    its checkpoint bytes read once and copied straight into place on the model's device
    (:mod:`crosschip.checkpoint.staged_read`); a sharded (DTensor) component reads only its
    rank's rows and columns; anything else streams one component at a time through its
    transforms."""
    from crosschip.checkpoint.sharded_load import load_local
    from crosschip.checkpoint.staged_read import load_placed

    release = getattr(source, "release", None)
    found = check_source(model, source, ignored)
    whole = [b for b in found if not _is_sharded(b.module)]
    rest = set(map(id, load_placed(whole, source))) | {id(b) for b in found if _is_sharded(b.module)}
    for b in (b for b in found if id(b) in rest):
        if not (_is_sharded(b.module) and load_local(b, source)):
            _load_physical(b, b.from_hf({key: source.get(key) for key in b.hf_shapes}))
        if release is not None:
            release()  # unmap what this component touched, so file pages do not pile up


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.get_default_dtype())


def _is_sharded(module: nn.Module) -> bool:
    return bool(local_shards.declared(module)) or any(hasattr(p, "device_mesh") for p in module.parameters())
