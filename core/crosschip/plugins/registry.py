"""The registry: every discovered plugin, the backends and components they register, and why any
of them cannot be used. Built lazily on first use, never at ``import crosschip``."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from crosschip.errors import PluginError, UnknownNameError
from crosschip.plugins import env, hookspecs
from crosschip.plugins.descriptors import (
    PLUGIN_API_VERSION,
    BackendDescriptor,
    ComponentImpl,
    LayoutImpl,
    Probe,
)
from crosschip.specs import COMPONENTS

logger = logging.getLogger("crosschip.plugins")

REFERENCE = "reference"

# Plugin statuses shown by `crosschip backends`.
LOADED = "loaded"
BUILTIN = "builtin"
FAILED = "failed"
INCOMPATIBLE = "incompatible"
DISABLED = "disabled"


@dataclass
class PluginRecord:
    """One plugin: an entry point, a development module, or the built-in reference."""

    name: str
    source: str  # "entry point", "module" (CROSSCHIP_PLUGIN_MODULES) or "builtin"
    value: str  # the module path the entry point names
    distribution: str = "-"
    version: str = "-"
    status: str = LOADED
    reason: str = ""
    module: ModuleType | None = field(default=None, repr=False)
    backends: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.status in (LOADED, BUILTIN)


@dataclass
class BackendRecord:
    descriptor: BackendDescriptor
    plugin: PluginRecord
    _probe: Probe | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.descriptor.name

    def probe(self) -> Probe:
        """Run the availability probe once; a probe that raises means unavailable."""
        if self._probe is None:
            try:
                result = self.descriptor.probe()
                if not isinstance(result, Probe):
                    result = Probe(bool(result), "" if result else "probe returned false")
            except Exception as exc:  # a broken probe must not break other backends
                result = Probe(False, f"availability probe raised {type(exc).__name__}: {exc}")
            self._probe = result
        return self._probe


class Registry:
    """Plugins, backends, component implementations and weight layouts."""

    def __init__(self):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.backends: dict[str, BackendRecord] = {}
        self.components: dict[tuple[str, str], ComponentImpl] = {}
        self.layouts: dict[tuple[str, str], LayoutImpl] = {}

    # -- registration -------------------------------------------------------------------
    def add_plugin(self, record: PluginRecord, module: ModuleType) -> None:
        """Register one plugin module in isolation: any problem marks *this* plugin failed or
        incompatible, unregisters it, and leaves everything else untouched."""
        self.plugins[record.name] = record
        record.module = module
        try:
            unknown = _unknown_hooks(module)
            if unknown:
                raise _Incompatible(
                    f"implements unknown hook(s) {', '.join(unknown)}; known hooks: "
                    f"{', '.join(sorted(_known_hooks()))}"
                )
            try:
                self.pm.register(module, name=record.name)
            except pluggy.PluginValidationError as exc:
                raise _Incompatible(f"hook validation failed: {exc}") from exc
            descriptors = self._call_one(module, "crosschip_register_backends")
            self._check_descriptors(record, descriptors)
            components = self._call_one(module, "crosschip_register_components")
            layouts = self._call_one(module, "crosschip_register_layouts")
            owned = {d.name for d in descriptors}
            self._check_owned(record, components, owned, ComponentImpl, "component")
            self._check_owned(record, layouts, owned, LayoutImpl, "layout")
        except _Incompatible as exc:
            self._reject(record, module, INCOMPATIBLE, str(exc))
            return
        except Exception as exc:
            self._reject(record, module, FAILED, f"{type(exc).__name__}: {exc}")
            return
        for descriptor in descriptors:
            self.backends[descriptor.name] = BackendRecord(descriptor, record)
            record.backends.append(descriptor.name)
        for impl in components:
            self.components[(impl.backend, impl.component)] = impl
        for impl in layouts:
            self.layouts[(impl.backend, impl.component)] = impl

    def add_failure(self, record: PluginRecord) -> None:
        self.plugins[record.name] = record

    def _reject(self, record: PluginRecord, module, status: str, reason: str) -> None:
        record.status, record.reason = status, reason
        if self.pm.is_registered(module):
            self.pm.unregister(module)
        logger.warning("crosschip plugin %r is %s: %s", record.name, status, reason)

    def _call_one(self, module, hook_name: str) -> list:
        """Call one hook on one plugin only, so a result is attributed to its plugin."""
        caller = self.pm.subset_hook_caller(
            hook_name, remove_plugins=[p for p in self.pm.get_plugins() if p is not module]
        )
        return [item for result in caller() for item in (result or [])]

    def _check_descriptors(self, record: PluginRecord, descriptors) -> None:
        if not descriptors:
            raise _Incompatible("registers no backend (crosschip_register_backends returned nothing)")
        for d in descriptors:
            if not isinstance(d, BackendDescriptor):
                raise _Incompatible(f"crosschip_register_backends returned {type(d).__name__}, "
                                    "expected crosschip.BackendDescriptor")
            if d.api_version != PLUGIN_API_VERSION:
                raise _Incompatible(
                    f"backend {d.name!r} declares plugin API version {d.api_version}, "
                    f"this crosschip supports version {PLUGIN_API_VERSION}"
                )
            if (d.name == REFERENCE and record.source != "builtin") or d.name in self.backends:
                owner = REFERENCE if d.name == REFERENCE else self.backends[d.name].plugin.name
                raise _Incompatible(f"backend name {d.name!r} is already registered by {owner!r}")
        if record.source == "entry point" and record.name not in {d.name for d in descriptors}:
            raise _Incompatible(
                f"entry point {record.name!r} registers backend(s) "
                f"{', '.join(d.name for d in descriptors)}; the entry-point name must be the "
                "backend name"
            )

    @staticmethod
    def _check_owned(record, impls, owned, cls, what) -> None:
        for impl in impls:
            if not isinstance(impl, cls):
                raise _Incompatible(f"{what} registration is {type(impl).__name__}, "
                                    f"expected crosschip.{cls.__name__}")
            if impl.backend not in owned:
                raise _Incompatible(f"registers a {what} for backend {impl.backend!r}, which it "
                                    f"does not own (owns {', '.join(sorted(owned))})")
            if impl.component not in COMPONENTS:
                raise UnknownNameError("component", impl.component, COMPONENTS,
                                       where=f"plugin {record.name!r}")

    # -- queries --------------------------------------------------------------------------
    def backend(self, name: str) -> BackendRecord:
        try:
            return self.backends[name]
        except KeyError:
            raise UnknownNameError("backend", name, self.backends) from None

    def backend_names(self) -> list[str]:
        return sorted(self.backends)

    def components_of(self, backend: str) -> list[str]:
        return [c for c in COMPONENTS if (backend, c) in self.components]

    def problems(self) -> list[PluginRecord]:
        return [p for p in self.plugins.values() if p.status in (FAILED, INCOMPATIBLE)]

    def raise_for_problems(self) -> None:
        """Strict mode: any failed or incompatible plugin is an error."""
        problems = self.problems()
        if problems:
            lines = "; ".join(f"{p.name} ({p.value}) is {p.status}: {p.reason}" for p in problems)
            raise PluginError(f"strict mode: plugin problem(s): {lines}")

    def plugin_of(self, backend: str):
        return self.backend(backend).plugin.module

    def call_on(self, backends, hook_name: str, **kwargs) -> list:
        """Call a hook on the plugins owning ``backends`` (each plugin once, in the given order)."""
        modules = []
        for name in backends:
            module = self.plugin_of(name)
            if module is not None and module not in modules:
                modules.append(module)
        results = []
        for module in modules:
            caller = self.pm.subset_hook_caller(
                hook_name, remove_plugins=[p for p in self.pm.get_plugins() if p is not module]
            )
            results.extend(caller(**kwargs))
        return results


class _Incompatible(Exception):
    pass


def _known_hooks() -> set[str]:
    return {n for n in dir(hookspecs) if n.startswith("crosschip_")}


def _unknown_hooks(module) -> list[str]:
    marker = f"{hookspecs.PROJECT}_impl"
    known = _known_hooks()
    return sorted(
        name
        for name in dir(module)
        if name.startswith("crosschip_")
        and hasattr(getattr(module, name), marker)
        and name not in known
    )


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first call."""
    global _registry
    with _lock:
        if _registry is None:
            from crosschip.plugins.loader import load_registry

            _registry = load_registry()
        return _registry


def reset_registry() -> None:
    """Forget the loaded registry so the next use re-reads entry points and environment."""
    global _registry
    with _lock:
        _registry = None


def strict_from_env(strict: bool | None) -> bool:
    return env.flag(env.STRICT) if strict is None else bool(strict)
