"""Environment variables that steer plugin loading and backend selection (read at use, never at
import, so tests and launchers can set them late)."""

from __future__ import annotations

import os

BACKEND = "CROSSCHIP_BACKEND"
BACKEND_PREFIX = "CROSSCHIP_BACKEND_"
PLUGINS = "CROSSCHIP_PLUGINS"
DISABLE_PLUGINS = "CROSSCHIP_DISABLE_PLUGINS"
PLUGIN_AUTOLOAD = "CROSSCHIP_PLUGIN_AUTOLOAD"
PLUGIN_MODULES = "CROSSCHIP_PLUGIN_MODULES"
PLUGIN_TRACE = "CROSSCHIP_PLUGIN_TRACE"
PROBE_TIMEOUT = "CROSSCHIP_PROBE_TIMEOUT"
STRICT = "CROSSCHIP_STRICT"
REQUIRE_HARDWARE = "CROSSCHIP_REQUIRE_HARDWARE"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def name_list(var: str) -> list[str] | None:
    """Comma-separated names, or None when the variable is unset."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def flag(var: str, default: bool = False) -> bool:
    raw = os.environ.get(var)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    from crosschip.errors import ConfigurationError

    raise ConfigurationError(f"{var}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def component_variable(component: str) -> str:
    return BACKEND_PREFIX + component.upper()


def seconds(var: str, default: float) -> float:
    """A positive, finite number of seconds, or ``default`` when the variable is unset or empty."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        from crosschip.errors import ConfigurationError

        raise ConfigurationError(f"{var}={raw!r}: expected a positive number of seconds")
    return value
