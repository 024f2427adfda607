"""Plain data a plugin hands to core: backend descriptors, component and layout registrations."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Union

#: Bumped when a hook or descriptor changes incompatibly. A plugin declaring another value is
#: marked incompatible and not used.
PLUGIN_API_VERSION = 1

Factory = Union[str, Callable[..., Any]]


def resolve_callable(target: Factory) -> Callable[..., Any]:
    """Turn ``"package.module:attribute"`` into the attribute, importing lazily; pass callables
    through. Lazy strings keep plugin registration cheap (no accelerator library imported)."""
    if callable(target):
        return target
    module_name, _, attr = str(target).partition(":")
    if not attr:
        raise ValueError(f"lazy factory {target!r} must look like 'package.module:attribute'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Probe:
    """Result of a backend's availability probe."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class BackendDescriptor:
    """What a backend is. ``probe`` must be cheap and must never initialise a device: it runs
    whenever backends are listed or resolved. ``fallbacks`` names backends placed right after
    this one in its chain (before ``reference``); like any chain member they are skipped when
    unavailable. ``declined_kinds`` maps a component kind the backend knowingly does not build to
    the reason: it is recorded as that backend's decline wherever the kind is resolved (so a strict
    run that would end on ``reference`` says why), where a kind it simply never heard of is not."""

    name: str
    priority: int
    device_types: tuple[str, ...]
    probe: Callable[[], Probe]
    api_version: int = PLUGIN_API_VERSION
    fallbacks: tuple[str, ...] = ()
    description: str = ""
    #: Reduced-precision compute modes the backend implements (``"fp8"``); dtypes are universal.
    precisions: tuple[str, ...] = ()
    declined_kinds: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ComponentImpl:
    """One backend's implementation of one component.

    ``factory(spec, ctx)`` returns an ``nn.Module``; ``supports(spec, ctx)`` returns ``None`` to
    accept or a human-readable reason to decline. Either may be a lazy ``"module:attr"`` string.
    ``fuses_input_norm`` says the module applies the spec's ``input_norm`` itself.
    ``handles`` lists the spec extensions the implementation honours (``"offset"``,
    ``"softcap"``, ``"input_norm=LayerNormSpec"``..., see :func:`crosschip.specs.extensions_used`;
    ``("*",)`` for all): a spec setting one it does not list is declined on its behalf, so an
    implementation written before a field existed never silently ignores it.
    """

    backend: str
    component: str
    factory: Factory
    supports: Factory | None = None
    fuses_input_norm: bool = False
    handles: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayoutImpl:
    """How a backend's component stores its weights: ``transform(spec, ctx)`` returns a
    :class:`crosschip.weights.layouts.Transform` from canonical role names to physical parameter names
    (relative to the component module)."""

    backend: str
    component: str
    transform: Factory
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
