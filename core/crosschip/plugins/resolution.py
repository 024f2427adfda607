"""Which backends may build a component, in order.

Precedence: explicit argument > ``CROSSCHIP_BACKEND_<COMPONENT>`` > ``CROSSCHIP_BACKEND`` > auto
(available backends by descending priority, ties by name) > ``reference``. A named backend's
declared fallbacks follow it. The result depends only on names, priorities and probes, never on
entry-point or registration order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from crosschip.errors import ConfigurationError, UnknownNameError
from crosschip.plugins import env
from crosschip.plugins.registry import REFERENCE, Registry

BackendChoice = Union[str, Sequence[str], None]
AUTO = "auto"


@dataclass(frozen=True)
class Chain:
    """The backends that may build a component, in order, and where that order came from."""

    backends: tuple[str, ...]
    source: str
    #: The backends the request named (none for auto); the rest are their declared fallbacks.
    named: tuple[str, ...] = ()

    @property
    def accelerated(self) -> bool:
        """Whether anything other than the reference backend was asked for."""
        return any(b != REFERENCE for b in self.backends)


def parse_names(value: BackendChoice) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).strip() for v in value]


def check_component_name(name: str, where: str | None = None, registry: Registry | None = None) -> str:
    """``name`` if it is a component kind (built-in or a plugin's), else an error listing them."""
    from crosschip.plugins.registry import get_registry

    registry = registry or get_registry()
    if name not in registry.kinds:
        raise UnknownNameError("component", name, registry.component_names(), where=where)
    return name


def check_environment(registry: Registry | None = None) -> None:
    """Reject ``CROSSCHIP_BACKEND_<X>`` variables whose X is no component, or not upper case:
    resolution reads only the upper-case name (as environments are case-sensitive on POSIX), so
    ``CROSSCHIP_BACKEND_attention`` would be silently ignored."""
    for var in os.environ:
        if var.startswith(env.BACKEND_PREFIX):
            component = check_component_name(var[len(env.BACKEND_PREFIX):].lower(),
                                              where=f"environment variable {var}", registry=registry)
            if var != env.component_variable(component):
                raise ConfigurationError(f"environment variable {var}: component variables are upper case; "
                                         f"set {env.component_variable(component)} instead")


def auto_order(registry: Registry) -> list[str]:
    """Available non-reference backends by descending priority (ties by name)."""
    available = [
        rec for name, rec in registry.backends.items() if name != REFERENCE and rec.probe().available
    ]
    available.sort(key=lambda rec: (-rec.descriptor.priority, rec.name))
    return [rec.name for rec in available]


def validate_backend_names(registry: Registry, names: Sequence[str], where: str) -> None:
    for name in names:
        if name == REFERENCE or name in registry.backends:
            continue
        plugin = registry.plugins.get(name)
        if plugin is not None:
            raise ConfigurationError(
                f"backend {name!r} (from {where}) cannot be used: its plugin is {plugin.status}: "
                f"{plugin.reason}"
            )
        raise UnknownNameError("backend", name, {REFERENCE, *registry.backends, AUTO}, where=where)


def resolve_chain(
    registry: Registry,
    component: str,
    backend: BackendChoice = None,
    components: Mapping[str, BackendChoice] | None = None,
) -> Chain:
    """The chain for ``component``: see the module docstring for the precedence."""
    check_component_name(component, registry=registry)
    per_component = (components or {}).get(component)
    var = env.component_variable(component)
    candidates = [
        (per_component, f"argument components[{component!r}]"),
        (backend, "argument"),
        (os.environ.get(var), var),
        (os.environ.get(env.BACKEND), env.BACKEND),
    ]
    names, source, named = [], AUTO, ()
    for value, origin in candidates:
        parsed = parse_names(value)
        if parsed and parsed != [AUTO]:
            names, source = parsed, origin
            break
    if names:
        if AUTO in names:
            raise ConfigurationError(f"{source}: 'auto' cannot be combined with backend names {names}")
        validate_backend_names(registry, names, source)
        named = tuple(names)
    else:
        names = auto_order(registry)

    ordered: list[str] = []
    for name in names:
        extra = [] if name == REFERENCE else list(registry.backends[name].descriptor.fallbacks)
        for candidate in [name, *extra]:
            if candidate not in ordered and (candidate == REFERENCE or candidate in registry.backends):
                ordered.append(candidate)
    if REFERENCE not in ordered:
        ordered.append(REFERENCE)
    return Chain(tuple(ordered), source, named)
