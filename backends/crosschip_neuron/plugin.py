"""Hook implementations of the ``neuron`` backend. The probe only looks for the Neuron SDK
packages and device nodes; it never imports them."""

from __future__ import annotations

import glob
import importlib.util

from crosschip import BackendDescriptor, Probe, hookimpl

NAME = "neuron"


def probe() -> Probe:
    missing = [m for m in ("torch_neuronx", "neuronx_distributed") if importlib.util.find_spec(m) is None]
    if missing:
        return Probe(False, f"{' and '.join(missing)} not installed (they ship with the AWS Neuron SDK, "
                            "not PyPI)")
    if not glob.glob("/dev/neuron*"):
        return Probe(False, "no Neuron device (/dev/neuron*) present")
    return Probe(True, "Neuron SDK importable and Neuron devices present")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=300,
        device_types=("xla",),
        probe=probe,
        description="neuronx-distributed parallel layers on AWS Trainium / Inferentia",
    )]


@hookimpl
def crosschip_register_components():
    return []


@hookimpl
def crosschip_environment_info():
    return {m: ("installed" if importlib.util.find_spec(m) else "not installed")
            for m in ("torch_neuronx", "neuronx_distributed")}
