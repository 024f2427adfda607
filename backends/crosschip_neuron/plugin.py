"""Hook implementations of the ``neuron`` backend (entry point ``crosschip.backends: neuron``).

The probe tells a Trainium host ("Neuron devices present") from NxD's CPU mode and from a
machine where neither runs, without importing neuronx-distributed or touching a device.
Factories initialise NxD's parallel state for the runtime before building a layer."""

from __future__ import annotations

import glob

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl
from crosschip_neuron import cpu_mode

NAME = "neuron"
MIN_NXD = (0, 18)
_S = "crosschip_neuron.support"
_L = "crosschip_neuron.layout"

_INSTALL = ("on a Trainium host, from the Neuron SDK's package index; on a CPU machine, the "
            "neuronx-distributed wheel with --no-deps, see the README")


def _nxd_version() -> tuple[str, tuple[int, ...]] | None:
    from importlib import metadata

    try:
        raw = metadata.version("neuronx-distributed")
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in raw.split("+")[0].split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return raw, tuple(parts)


def probe() -> Probe:
    if not cpu_mode.nxd_installed():
        return Probe(False, f"neuronx_distributed is not installed ({_INSTALL})")
    version = _nxd_version()
    if version is not None and version[1] < MIN_NXD:
        return Probe(False, f"neuronx-distributed {version[0]} is older than "
                            f"{'.'.join(map(str, MIN_NXD))}, which this backend needs")
    if cpu_mode.cpu_mode_requested():
        return Probe(True, f"NxD CPU mode ({cpu_mode.CPU_MODE}=1): neuronx-distributed on CPU with gloo "
                           "process groups, no Neuron device")
    if not cpu_mode.sdk_installed():
        return Probe(False, "torch_neuronx / torch_xla are not installed (the Neuron SDK) and NxD's CPU mode "
                            f"is off (set {cpu_mode.CPU_MODE}=1 to run neuronx-distributed on CPU)")
    if not glob.glob("/dev/neuron*"):
        return Probe(False, "no Neuron device (/dev/neuron*) present, and NxD's CPU mode is off "
                            f"(set {cpu_mode.CPU_MODE}=1 to run on CPU)")
    return Probe(True, "Neuron SDK importable and Neuron devices present")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=300,
        device_types=("xla", "cpu"),
        probe=probe,
        # No fallbacks: a component neuron declines goes to reference, which strict mode refuses
        # (on a Trainium host the torch backend could not run it anyway: it has no XLA device).
        description="neuronx-distributed parallel layers on AWS Trainium (or in NxD's CPU mode)",
        # The reference's experts select tokens by data-dependent masks, which an XLA trace cannot
        # keep static: a strict run refuses it with this reason instead of tracing it.
        declined_kinds={"moe": "neuronx-distributed's MoE layers (neuronx_distributed.modules.moe) are not "
                               "wired into this backend yet"},
    )]


def _factory(cls: str):
    def build(spec, ctx):
        import importlib

        from crosschip_neuron import state

        state.ensure(ctx.runtime)  # NxD's layers read their TP group when built
        return getattr(importlib.import_module("crosschip_neuron.components"), cls)(spec, ctx)

    build.__qualname__ = f"neuron.{cls}"
    return build


@hookimpl
def crosschip_register_components():
    return [
        ComponentImpl(NAME, "embedding", _factory("Embedding"), f"{_S}:vocabulary"),
        ComponentImpl(NAME, "qkv_projection", _factory("QKVProjection"), f"{_S}:projection"),
        ComponentImpl(NAME, "out_projection", _factory("Linear"), f"{_S}:out_projection"),
        ComponentImpl(NAME, "gated_mlp", _factory("GatedMLP"), f"{_S}:gated_mlp"),
        ComponentImpl(NAME, "lm_head", _factory("LMHead"), f"{_S}:vocabulary", handles=("softcap",)),
        ComponentImpl(NAME, "loss", _factory("CausalLMLoss"), f"{_S}:projection"),
    ]


@hookimpl
def crosschip_register_layouts():
    return [
        LayoutImpl(NAME, "qkv_projection", f"{_L}:qkv_layout"),
        LayoutImpl(NAME, "out_projection", f"{_L}:out_projection_layout"),
        LayoutImpl(NAME, "gated_mlp", f"{_L}:gated_mlp_layout"),
        LayoutImpl(NAME, "embedding", f"{_L}:identity_layout"),
        LayoutImpl(NAME, "lm_head", f"{_L}:identity_layout"),
    ]


@hookimpl
def crosschip_parallelize_model(model, runtime):
    from crosschip_neuron import parallel

    return parallel.parallelize(model, runtime)


@hookimpl
def crosschip_finalize_model(model, runtime):
    if runtime.parallel.tp > 1 and runtime.plan_owner == NAME:
        from crosschip_neuron import parallel

        parallel.attach_training_hooks(model, runtime)


@hookimpl
def crosschip_step_boundary(runtime):
    from crosschip_neuron import xla

    if xla.on_xla(runtime):  # CPU mode executes eagerly: nothing to cut
        xla.mark_step()


@hookimpl
def crosschip_training_state_format(model, runtime):
    from crosschip_neuron.nxd_training_state import NxdTrainingState

    if getattr(model, "lora_adapter", None) is not None:
        return None  # an adapter run saves its trainable adapter only, in the default format
    return NxdTrainingState(runtime)


@hookimpl
def crosschip_environment_info():
    version = _nxd_version()
    return {
        "neuronx_distributed": version[0] if version else "not installed",
        "neuron_sdk": "installed" if cpu_mode.sdk_installed() else "not installed",
        "nxd_cpu_mode": "on" if cpu_mode.cpu_mode_requested() else "off",
    }
