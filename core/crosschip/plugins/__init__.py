"""The plugin system: pluggy hook specs, entry-point loading, the registry and resolution.

Backend authors need only :data:`hookimpl` and the descriptor classes re-exported by
``crosschip`` itself.
"""

from crosschip.plugins.descriptors import (
    PLUGIN_API_VERSION,
    BackendDescriptor,
    ComponentImpl,
    LayoutImpl,
    Probe,
)
from crosschip.plugins.hookspecs import hookimpl, hookspec

__all__ = [
    "PLUGIN_API_VERSION",
    "BackendDescriptor",
    "ComponentImpl",
    "LayoutImpl",
    "Probe",
    "hookimpl",
    "hookspec",
]
