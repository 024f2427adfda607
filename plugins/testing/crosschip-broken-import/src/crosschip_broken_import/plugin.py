"""A plugin whose vendor bindings are missing: importing it raises ModuleNotFoundError, as a real
plugin does when its driver library is not installed. crosschip must mark it failed and carry on."""

import crosschip_xpu_driver_bindings  # noqa: F401  (deliberately absent)

from crosschip import BackendDescriptor, Probe, hookimpl


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor("broken_import", 10, ("cpu",), lambda: Probe(True))]
