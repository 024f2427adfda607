"""The registry: every discovered plugin, the backends and components they register, and why any
of them cannot be used. Built lazily on first use, never at ``import crosschip``."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from crosschip.errors import CrosschipError, PluginError, UnknownNameError
from crosschip.plugins import env, hookspecs
from crosschip.plugins.contracts import ContractError, registrations
from crosschip.plugins.descriptors import (
    PLUGIN_API_VERSION,
    BackendDescriptor,
    ComponentImpl,
    LayoutImpl,
    Probe,
)
from crosschip.plugins.probing import run_probe
from crosschip.components import BUILTIN as BUILTIN_KINDS
from crosschip.components import ComponentKind

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
    _probing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.descriptor.name

    def probe(self) -> Probe:
        """The availability probe's answer, asked once per process and bounded in time (see
        probing.py); a backend whose plugin failed after registration is unavailable."""
        if not self.plugin.usable:
            return Probe(False, f"its plugin is {self.plugin.status}: {self.plugin.reason}")
        with self._probing:  # one probe run even when threads ask at once
            if self._probe is None:
                self._probe = run_probe(self.descriptor.probe, self.name)
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
        #: Every component kind: the built-in ones, then those plugins register.
        self.kinds: dict[str, ComponentKind] = {k.name: k for k in BUILTIN_KINDS}
        self._kind_owner: dict[str, str] = {}  # plugin-registered kind -> its plugin's name
        self._registered_by: dict[int, PluginRecord] = {}  # id(module) -> the record registering it

    # -- registration -------------------------------------------------------------------
    def add_plugin(self, record: PluginRecord, module: ModuleType) -> None:
        """Register one plugin module in isolation: any problem marks *this* plugin failed or
        incompatible, unregisters it, and leaves everything else untouched. A module that is
        already registered (an entry point and ``CROSSCHIP_PLUGIN_MODULES`` naming one module) is
        recorded as disabled: registering it again would fail, and that failure must not
        unregister the original's hooks."""
        self.plugins[record.name] = record
        owner = self._registered_by.get(id(module))
        if owner is not None and self.pm.is_registered(module):
            record.status = DISABLED
            record.reason = f"module {record.value} is already registered as plugin {owner.name!r}"
            logger.info("crosschip plugin %r: %s", record.name, record.reason)
            return
        record.module = module
        try:
            unknown = _unknown_hooks(module)
            if unknown:
                raise ContractError(
                    f"implements unknown hook(s) {', '.join(unknown)}; known hooks: "
                    f"{', '.join(sorted(_known_hooks()))}"
                )
            try:
                self.pm.register(module, name=record.name)
            except pluggy.PluginValidationError as exc:
                raise ContractError(f"hook validation failed: {exc}") from exc
            self._registered_by[id(module)] = record
            descriptors = self._call_one(module, "crosschip_register_backends", BackendDescriptor)
            self._check_descriptors(record, descriptors)
            kinds = self._call_one(module, "crosschip_register_component_kinds", ComponentKind)
            self._check_kinds(kinds)
            known = {**self.kinds, **{k.name: k for k in kinds}}
            components = self._call_one(module, "crosschip_register_components", ComponentImpl)
            layouts = self._call_one(module, "crosschip_register_layouts", LayoutImpl)
            owned = {d.name for d in descriptors}
            self._check_owned(record, components, owned, "component", known)
            self._check_owned(record, layouts, owned, "layout", known)
        except ContractError as exc:
            self._reject(record, module, INCOMPATIBLE, str(exc))
            return
        except _HookFailed as exc:
            self._reject(record, module, FAILED, str(exc))
            return
        except (Exception, SystemExit) as exc:  # KeyboardInterrupt still stops the process
            self._reject(record, module, FAILED, f"{type(exc).__name__}: {exc}")
            return
        for descriptor in descriptors:
            self.backends[descriptor.name] = BackendRecord(descriptor, record)
            record.backends.append(descriptor.name)
        for kind in kinds:
            self._add_kind(kind, record)
        for impl in components:
            self.components[(impl.backend, impl.component)] = impl
        for impl in layouts:
            self.layouts[(impl.backend, impl.component)] = impl

    def add_failure(self, record: PluginRecord) -> None:
        self.plugins[record.name] = record

    def _reject(self, record: PluginRecord, module, status: str, reason: str) -> None:
        record.status, record.reason = status, reason
        if self._registered_by.get(id(module)) is record:
            del self._registered_by[id(module)]
            self.pm.unregister(module)
        logger.warning("crosschip plugin %r is %s: %s", record.name, status, reason)

    def fail(self, record: PluginRecord, reason: str) -> None:
        """Mark a registered plugin failed after the fact (a hook broke its contract). Its
        backends stay registered, so models already built with them keep their layouts and
        hooks, but they are unavailable to every chain resolved from now on."""
        if record.usable:
            record.status, record.reason = FAILED, reason
            logger.warning("crosschip plugin %r is %s: %s", record.name, FAILED, reason)

    def _call_one(self, module, hook_name: str, cls: type) -> list:
        """Call one registration hook on one plugin only, so a result is attributed to its
        plugin; what it returns is checked against the plugin API (contracts.py)."""
        caller = self.pm.subset_hook_caller(
            hook_name, remove_plugins=[p for p in self.pm.get_plugins() if p is not module]
        )
        try:
            results = caller()
        except (Exception, SystemExit) as exc:
            raise _HookFailed(f"{hook_name} raised {type(exc).__name__}: {exc}") from exc
        return registrations(hook_name, results, cls)

    def _check_descriptors(self, record: PluginRecord, descriptors) -> None:
        if not descriptors:
            raise ContractError("registers no backend (crosschip_register_backends returned nothing)")
        for d in descriptors:
            if d.api_version != PLUGIN_API_VERSION:
                raise ContractError(
                    f"backend {d.name!r} declares plugin API version {d.api_version}, "
                    f"this crosschip supports version {PLUGIN_API_VERSION}"
                )
            if (d.name == REFERENCE and record.source != "builtin") or d.name in self.backends:
                owner = REFERENCE if d.name == REFERENCE else self.backends[d.name].plugin.name
                raise ContractError(f"backend name {d.name!r} is already registered by {owner!r}")
        if record.source == "entry point" and record.name not in {d.name for d in descriptors}:
            raise ContractError(
                f"entry point {record.name!r} registers backend(s) "
                f"{', '.join(d.name for d in descriptors)}; the entry-point name must be the "
                "backend name"
            )

    @staticmethod
    def _check_owned(record, impls, owned, what, known) -> None:
        for impl in impls:
            if impl.backend not in owned:
                raise ContractError(f"registers a {what} for backend {impl.backend!r}, which it "
                                    f"does not own (owns {', '.join(sorted(owned))})")
            if impl.component not in known:
                # A plugin implements built-in kinds, its own, and those of plugins loaded before
                # it; naming any other is an error either way, so the order is never consulted.
                raise UnknownNameError("component", impl.component, known, where=f"plugin {record.name!r}")

    def _check_kinds(self, kinds) -> None:
        names = [k.name for k in kinds]
        for name in names:
            if name in self.kinds:
                owner = self._kind_owner.get(name, "crosschip")
                raise ContractError(f"registers component kind {name!r}, which {owner!r} already defines")
            if names.count(name) > 1:
                raise ContractError(f"registers component kind {name!r} twice")

    def _add_kind(self, kind: ComponentKind, record: PluginRecord) -> None:
        """A plugin's kind, which the reference backend builds with the kind's own reference
        implementation, as it does the built-in kinds (see ``crosschip.reference.plugin``)."""
        from crosschip.reference.plugin import reference_impls

        self.kinds[kind.name] = kind
        self._kind_owner[kind.name] = record.name
        impl, layout = reference_impls(kind)
        self.components[(REFERENCE, kind.name)] = impl
        self.layouts[(REFERENCE, kind.name)] = layout

    # -- queries --------------------------------------------------------------------------
    def backend(self, name: str) -> BackendRecord:
        try:
            return self.backends[name]
        except KeyError:
            raise UnknownNameError("backend", name, self.backends) from None

    def backend_names(self) -> list[str]:
        return sorted(self.backends)

    def component_names(self) -> list[str]:
        """Every kind's name: the built-in ones in their order, then plugins' by name."""
        builtin = [k.name for k in BUILTIN_KINDS]
        return builtin + sorted(n for n in self.kinds if n not in builtin)

    def kind(self, name: str) -> ComponentKind:
        try:
            return self.kinds[name]
        except KeyError:
            raise UnknownNameError("component", name, self.component_names()) from None

    def components_of(self, backend: str) -> list[str]:
        return [c for c in self.component_names() if (backend, c) in self.components]

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

    #: Hooks whose failure with anything but a crosschip error fails only their plugin:
    #: validation runs on every backend a runtime *may* use, so one plugin's bug must not stop
    #: runtimes (or ``crosschip backends``) that end up using others.
    CONTAINED_HOOKS = frozenset({"crosschip_validate_runtime"})

    def call_on(self, backends, hook_name: str, **kwargs) -> list:
        """Call a hook on the plugins owning ``backends`` (each plugin once, in the given order).

        A crosschip error (``ConfigurationError``) is the hook's answer and propagates. Another
        error in a :data:`CONTAINED_HOOKS` hook fails its plugin (:meth:`fail`; an error when
        the ``runtime`` argument is strict); in any other hook it propagates, but ``sys.exit``
        becomes a :class:`PluginError` naming the plugin instead of silently ending the process.
        """
        records: list[PluginRecord] = []
        for name in backends:
            record = self.backend(name).plugin
            if hook_name in self.CONTAINED_HOOKS and not record.usable:
                continue  # failed already: asked no more
            if record.module is not None and all(r is not record for r in records):
                records.append(record)
        results = []
        for record in records:
            caller = self.pm.subset_hook_caller(
                hook_name, remove_plugins=[p for p in self.pm.get_plugins() if p is not record.module]
            )
            try:
                results.extend(caller(**kwargs))
            except CrosschipError:
                raise
            except (Exception, SystemExit) as exc:
                reason = f"{hook_name} raised {type(exc).__name__}: {exc}"
                if hook_name in self.CONTAINED_HOOKS:
                    self.fail(record, reason)
                    if getattr(kwargs.get("runtime"), "strict", False):
                        self.raise_for_problems()
                    continue
                if isinstance(exc, SystemExit):
                    raise PluginError(f"plugin {record.name!r}: {reason}") from exc
                raise
        return results


class _HookFailed(Exception):
    """A registration hook raised: its plugin is failed, with the hook named in the reason."""


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
