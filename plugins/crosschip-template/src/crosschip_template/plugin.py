"""Hook implementations of the ``template`` backend.

crosschip imports this module (named by the entry point) whenever it lists or resolves backends,
so it stays cheap: component modules are named by lazy ``"module:attr"`` strings and imported only
when a runtime builds one.
"""

from __future__ import annotations

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl

NAME = "template"  # must equal the entry-point name
_COMPONENTS = "crosschip_template.components"
_LAYOUT = "crosschip_template.layout"


def probe() -> Probe:
    # Real hardware: look for the driver package with importlib.util.find_spec and for device
    # nodes; never import the device library or open a device here.
    return Probe(True, "CPU, torch.nn.functional.rms_norm")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        # Below torch (100): under auto, torch builds what it implements and this backend only
        # what torch does not (rms_norm). Accelerator backends sit above: te 200, neuron 300.
        priority=50,
        device_types=("cpu",),
        probe=probe,
        description="template: fused rms_norm on CPU; reference for every other component",
    )]


@hookimpl
def crosschip_register_components():
    # One component; every other one falls back along the chain (ultimately to reference).
    return [ComponentImpl(NAME, "rms_norm", f"{_COMPONENTS}:FusedRMSNorm",
                          supports=f"{_COMPONENTS}:supports_rms_norm")]


@hookimpl
def crosschip_register_layouts():
    # How the module's parameters map to the Hugging Face weights of the component.
    return [LayoutImpl(NAME, "rms_norm", f"{_LAYOUT}:rms_norm_layout")]


@hookimpl
def crosschip_environment_info():
    import importlib.metadata

    return {"crosschip-template": importlib.metadata.version("crosschip-template")}
