"""Discovers plugins through the ``crosschip.backends`` entry-point group (and, for development,
``CROSSCHIP_PLUGIN_MODULES``) and registers each in isolation."""

from __future__ import annotations

import importlib
import logging
from importlib import metadata

from crosschip.plugins import env
from crosschip.plugins.registry import (
    BUILTIN,
    DISABLED,
    FAILED,
    REFERENCE,
    PluginRecord,
    Registry,
)

ENTRY_POINT_GROUP = "crosschip.backends"
logger = logging.getLogger("crosschip.plugins")


def _entry_points() -> list[metadata.EntryPoint]:
    # Sorted so that listing is stable; resolution never depends on this order anyway.
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: (ep.name, ep.value))


def load_registry() -> Registry:
    registry = Registry()
    if env.flag(env.PLUGIN_TRACE):
        registry.pm.trace.root.setwriter(lambda msg: logger.debug("pluggy: %s", msg.rstrip()))
        registry.pm.enable_tracing()

    from crosschip.reference import plugin as reference_plugin

    registry.add_plugin(
        PluginRecord(REFERENCE, BUILTIN, reference_plugin.__name__, "crosschip",
                     _own_version(), status=BUILTIN),
        reference_plugin,
    )

    allow = env.name_list(env.PLUGINS)
    block = set(env.name_list(env.DISABLE_PLUGINS) or [])
    autoload = env.flag(env.PLUGIN_AUTOLOAD, default=True)

    seen: dict[str, list[metadata.EntryPoint]] = {}
    for ep in _entry_points():
        seen.setdefault(ep.name, []).append(ep)

    for name, eps in seen.items():
        ep = eps[0]
        record = PluginRecord(name, "entry point", ep.value, *_dist(ep))
        if len(eps) > 1:
            record.status, record.reason = FAILED, (
                f"entry point name {name!r} is declared by several distributions "
                f"({', '.join(_dist(e)[0] for e in eps)}); uninstall all but one"
            )
            registry.add_failure(record)
            continue
        skip = _skip_reason(name, allow, block, autoload)
        if skip:
            record.status, record.reason = DISABLED, skip
            registry.add_failure(record)
            continue
        _load(registry, record, ep.load)

    for path in dict.fromkeys(env.name_list(env.PLUGIN_MODULES) or []):  # each once, in order
        record = PluginRecord(path, "module", path)
        _load(registry, record, lambda p=path: importlib.import_module(p))
    return registry


def _load(registry: Registry, record: PluginRecord, load) -> None:
    try:
        module = load()
    # Any import-time failure, sys.exit included, stays inside this plugin; KeyboardInterrupt
    # still stops the process.
    except (Exception, SystemExit) as exc:
        record.status, record.reason = FAILED, f"import failed: {type(exc).__name__}: {exc}"
        logger.warning("crosschip plugin %r failed to import: %s", record.name, record.reason)
        registry.add_failure(record)
        return
    if record.source == "module":
        # A development module has no entry-point name: name it after the backend it registers.
        record.distribution = "-"
    registry.add_plugin(record, module)
    if record.source == "module" and record.backends:
        registry.plugins.pop(record.name)
        record.name = record.backends[0]
        registry.plugins[record.name] = record


def _skip_reason(name: str, allow, block, autoload: bool) -> str:
    if name in block:
        return f"disabled by {env.DISABLE_PLUGINS}"
    if allow is not None and name not in allow:
        return f"not in {env.PLUGINS}={','.join(allow)}"
    if not autoload and allow is None:
        return f"{env.PLUGIN_AUTOLOAD}=0 and not named in {env.PLUGINS}"
    return ""


def _dist(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "-", "-"
    return dist.metadata["Name"] or "-", dist.version or "-"


def _own_version() -> str:
    try:
        return metadata.version("crosschip")
    except metadata.PackageNotFoundError:
        return "-"
