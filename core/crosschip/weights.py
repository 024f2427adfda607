"""The state-dict adapter: moves weights between a model's physical layout (whatever each
backend's modules hold) and the canonical Hugging Face layout, component by component, through
the layouts backends register. One component's tensors are in flight at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch import nn

from crosschip.errors import CheckpointError
from crosschip.layouts import IDENTITY, Transform, canonical_shapes
from crosschip.plugins.descriptors import resolve_callable
from crosschip.runtime import BuildContext, ComponentInfo


@dataclass(frozen=True)
class Binding:
    """One component of a model and where its canonical weights live in a checkpoint."""

    path: str
    module: nn.Module
    info: ComponentInfo
    transform: Transform
    names: dict[str, str]  # role -> Hugging Face key
    shapes: dict[str, tuple[int, ...]]  # role -> canonical shape


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...
    def describe(self, key: str) -> str: ...


def _hf_name(path: str, role: str, prefixes: dict[str, str]) -> str:
    head, _, tail = role.partition(".")
    if tail and head in prefixes:
        return f"{prefixes[head]}.{tail}"
    return f"{prefixes.get('', path)}.{role}"


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
        shapes = canonical_shapes(info.component, info.spec, info.fuses_input_norm)
        prefixes = name_map.get(path, {})
        names = {role: _hf_name(path, role, prefixes) for role in shapes}
        found.append(Binding(path, module, info, transform, names, shapes))
        for p in module.parameters():
            owners[id(p)] = path
    strays = [n for n, p in model.named_parameters() if id(p) not in owners]
    if strays:
        raise TypeError(f"parameters outside any component cannot be mapped to a checkpoint: {strays}")
    return found


def _physical(binding: Binding, grads: bool) -> dict[str, torch.Tensor]:
    if grads:
        return {n: p.grad for n, p in binding.module.named_parameters() if p.grad is not None}
    return dict(binding.module.state_dict())


def iter_canonical(model: nn.Module, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_key, tensor)`` for every canonical weight (or its gradient), one component at a time."""
    for b in bindings(model):
        canonical = b.transform.invert(_physical(b, grads))
        if not grads and set(canonical) != set(b.shapes):
            raise RuntimeError(
                f"layout of backend {b.info.backend!r} for {b.info.component} at {b.path} gives "
                f"roles {sorted(canonical)}, expected {sorted(b.shapes)}"
            )
        for role in b.shapes:  # a fixed order, so writers can plan shards from shapes alone
            if role in canonical:
                yield b.names[role], canonical[role]


def canonical_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """``(hf_key, bytes)`` in :func:`iter_canonical` order, without materialising any tensor."""
    out = []
    for b in bindings(model):
        itemsize = next((p.element_size() for p in b.module.parameters()), 4)
        for role, shape in b.shapes.items():
            out.append((b.names[role], itemsize * _numel(shape)))
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def canonical_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    return dict(iter_canonical(model, grads))


def check_source(model: nn.Module, source: TensorSource, ignored: set[str] = frozenset()) -> list[Binding]:
    """Strict key and shape check of a checkpoint against the model, before reading any tensor."""
    found = bindings(model)
    available = set(source.keys())
    expected: dict[str, tuple[int, ...]] = {}
    for b in found:
        for role, hf_key in b.names.items():
            expected[hf_key] = b.shapes[role]
    problems = []
    for key, shape in expected.items():
        if key not in available:
            problems.append(f"missing key {key!r} (expected shape {list(shape)})")
        elif tuple(source.shape(key)) != tuple(shape):
            problems.append(f"key {key!r} in {source.describe(key)} has shape "
                            f"{list(source.shape(key))}, expected {list(shape)}")
    unexpected = sorted(available - set(expected) - set(ignored))
    problems += [f"unexpected key {k!r} in {source.describe(k)}" for k in unexpected]
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return found


@torch.no_grad()
def load_canonical(model: nn.Module, source: TensorSource, ignored: set[str] = frozenset()) -> None:
    """Fill ``model`` from canonical tensors, streaming one component at a time."""
    for b in check_source(model, source, ignored):
        canonical = {role: source.get(key) for role, key in b.names.items()}
        physical = b.transform.apply(canonical)
        targets = b.module.state_dict()
        physical = {k: v.to(dtype=targets[k].dtype) if k in targets else v for k, v in physical.items()}
        b.module.load_state_dict(physical, strict=True)
