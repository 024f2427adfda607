"""What core accepts from a plugin's registration hooks, checked before anything uses it.

Descriptors and registrations are frozen dataclasses, but Python does not enforce their field
types: a ``priority="high"`` or ``device_types="cuda"`` would pass registration and crash a
listing later (or, for the string, match ``"cu" in "cuda"``). Every field is checked here, so a
wrong type makes its plugin incompatible with a reason naming the backend, the field, what was
found and what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from crosschip.components.kind import ComponentKind
from crosschip.plugins.descriptors import BackendDescriptor, ComponentImpl, LayoutImpl


class ContractError(Exception):
    """A plugin returned something the plugin API does not allow (its plugin is incompatible)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_tuple(value) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)


def _is_factory(value) -> bool:
    return isinstance(value, str) or callable(value)


# field -> (check, what is expected); every field of each class is listed.
_FIELDS: dict[type, dict[str, tuple[Callable[[Any], bool], str]]] = {
    BackendDescriptor: {
        "name": (lambda v: isinstance(v, str) and v != "" and not any(c in v for c in ", \t\n"),
                 "a non-empty str without commas or spaces"),
        "priority": (_is_int, "int"),
        "device_types": (_is_str_tuple, "a tuple of str"),
        "probe": (callable, "a callable"),
        "api_version": (_is_int, "int"),
        "fallbacks": (_is_str_tuple, "a tuple of str"),
        "description": (lambda v: isinstance(v, str), "str"),
        "precisions": (_is_str_tuple, "a tuple of str"),
    },
    ComponentImpl: {
        "backend": (lambda v: isinstance(v, str), "str"),
        "component": (lambda v: isinstance(v, str), "str"),
        "factory": (_is_factory, "a callable or a 'module:attr' str"),
        "supports": (lambda v: v is None or _is_factory(v), "None, a callable or a 'module:attr' str"),
        "fuses_input_norm": (lambda v: isinstance(v, bool), "bool"),
        "handles": (_is_str_tuple, "a tuple of str"),
    },
    LayoutImpl: {
        "backend": (lambda v: isinstance(v, str), "str"),
        "component": (lambda v: isinstance(v, str), "str"),
        "transform": (_is_factory, "a callable or a 'module:attr' str"),
        "extra": (lambda v: isinstance(v, dict), "dict"),
    },
}


_FIELDS[ComponentKind] = {
    "name": (lambda v: isinstance(v, str), "str"),
    "spec": (lambda v: isinstance(v, type) and dataclasses.is_dataclass(v), "a dataclass type"),
    **{name: (_is_factory, "a callable or a 'module:attr' str") for name in ("reference",)},
    **{name: (callable, "a callable") for name in ("weights", "call", "example", "cases", "tensor_parallel",
                                                   "helpers")},
    "reference_layout": (lambda v: v is None or _is_factory(v), "None, a callable or a 'module:attr' str"),
}


def registrations(hook: str, results: list, cls: type) -> list:
    """The items of every result one plugin's ``hook`` returned (None counts as nothing), each a
    ``cls`` whose fields have the declared types; tuple fields given as lists become tuples."""
    items = []
    for result in results:
        if result is None:
            continue
        if not isinstance(result, (list, tuple)):
            raise ContractError(f"{hook} returned {type(result).__name__}, expected a list")
        for item in result:
            if not isinstance(item, cls):
                raise ContractError(f"{hook} returned {type(item).__name__}, "
                                    f"expected crosschip.{cls.__name__}")
            items.append(_checked_fields(item, cls))
    return items


def _checked_fields(item, cls: type):
    if cls is BackendDescriptor:
        owner = f"backend {item.name!r}"
    elif cls is ComponentKind:
        owner = f"component kind {item.name!r}"
    else:
        owner = f"{cls.__name__} for {item.backend!r}/{item.component!r}"
    tuples = {}
    for name, (check, expected) in _FIELDS[cls].items():
        value = getattr(item, name)
        if not check(value):
            raise ContractError(f"{owner}: {name} is {type(value).__name__} ({value!r}), expected {expected}")
        if isinstance(value, list):
            tuples[name] = tuple(value)
    return dataclasses.replace(item, **tuples) if tuples else item
