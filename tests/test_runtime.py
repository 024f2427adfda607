"""Runtime resolution with the built-in backends: precedence, declines, strict mode, the report."""

from __future__ import annotations

import warnings

import pytest
import torch

import crosschip
from crosschip import (
    ConfigurationError,
    CrosschipWarning,
    LinearSpec,
    NormSpec,
    QKVSpec,
    RopeSpec,
    Runtime,
    StrictFallbackError,
    UnknownNameError,
)
from plugin_site import cpu_only

QKV = QKVSpec(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
#: A component the torch backend leaves to the reference (te implements it, on CUDA only).
ROPE = RopeSpec(8, 64, (("rope_theta", 10000.0), ("rope_type", "default")))


def test_import_loads_no_plugin():
    import subprocess
    import sys

    code = ("import sys, crosschip; "
            "assert 'crosschip_torch' not in sys.modules and 'crosschip.plugins.loader' not in sys.modules, "
            "sorted(m for m in sys.modules if 'crosschip' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_prefers_torch_over_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("CROSSCHIP_BACKEND", raising=False)
    rt = Runtime(device="cpu")
    assert rt.chain("qkv_projection").backends == ("torch", "reference")
    assert rt.chain("qkv_projection").source == "auto"
    module = rt.qkv_projection(QKV)
    assert module.crosschip_component.backend == "torch"
    assert rt.rms_norm(NormSpec(32)).crosschip_component.backend == "torch"
    # torch does not implement rotary: reference builds it, and that is no fallback warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rt.rotary(ROPE).crosschip_component.backend == "reference"


def test_precedence_argument_over_component_env_over_global_env(monkeypatch):
    monkeypatch.setenv("CROSSCHIP_BACKEND", "reference")
    monkeypatch.setenv("CROSSCHIP_BACKEND_QKV_PROJECTION", "torch")
    rt = Runtime(device="cpu")
    assert rt.chain("qkv_projection").source == "CROSSCHIP_BACKEND_QKV_PROJECTION"
    assert rt.qkv_projection(QKV).crosschip_component.backend == "torch"
    assert rt.chain("gated_mlp").source == "CROSSCHIP_BACKEND"
    assert rt.chain("gated_mlp").backends == ("reference",)

    explicit = Runtime("reference", device="cpu")
    assert explicit.chain("qkv_projection").source == "argument"
    assert explicit.qkv_projection(QKV).crosschip_component.backend == "reference"

    per_component = Runtime("reference", components={"qkv_projection": "torch"}, device="cpu")
    assert per_component.chain("qkv_projection").source == "argument components['qkv_projection']"
    assert per_component.qkv_projection(QKV).crosschip_component.backend == "torch"


def test_unknown_backend_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        Runtime("tpu9000")
    message = str(info.value)
    assert "tpu9000" in message
    for name in ("reference", "torch", "te", "neuron", "auto"):
        assert name in message


def test_unknown_component_lists_valid_names(monkeypatch):
    with pytest.raises(UnknownNameError, match="valid components: .*qkv_projection"):
        Runtime(components={"flash": "torch"})
    monkeypatch.setenv("CROSSCHIP_BACKEND_FLASH", "torch")
    with pytest.raises(UnknownNameError, match="CROSSCHIP_BACKEND_FLASH"):
        Runtime()


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("CROSSCHIP_BACKEND", "tpu")
    with pytest.raises(UnknownNameError, match=r"'tpu' \(from CROSSCHIP_BACKEND\)"):
        Runtime()
@cpu_only
def test_unavailable_request_falls_back_and_warns_once():
    rt = Runtime("te", device="cpu")
    # te's declared fallback is torch; torch builds what it implements.
    assert rt.chain("qkv_projection").backends == ("te", "torch", "reference")
    with pytest.warns(CrosschipWarning, match="fell back to the reference backend") as record:
        rt.rotary(ROPE)
        rt.rotary(ROPE)
    assert len(record) == 1
    assert "te: unavailable: transformer_engine is not installed" in str(record[0].message)
    decision = rt.report.decisions[-1]
    assert decision.backend == "reference"
    assert decision.declines[0][0] == "te"
    # te's declared fallback building it instead is no silent substitution either.
    with pytest.warns(CrosschipWarning, match=r"built by 'torch', a declared fallback, because the requested "
                                              r"backend is unavailable \(te: unavailable"):
        assert rt.qkv_projection(QKV).crosschip_component.backend == "torch"


@cpu_only
def test_unavailable_request_ending_on_a_declared_fallback_fails_when_strict():
    with pytest.raises(StrictFallbackError, match="qkv_projection .*declared fallback.*te: unavailable"):
        Runtime("te", device="cpu", strict=True).qkv_projection(QKV)
    # Naming the fallback too makes it a choice: no warning, also when strict.
    rt = Runtime("te,torch", device="cpu", strict=True)
    assert rt.qkv_projection(QKV).crosschip_component.backend == "torch"
@cpu_only
def test_strict_fallback_names_component_and_every_reason():
    rt = Runtime("te", device="cpu", strict=True)
    with pytest.raises(StrictFallbackError) as info:
        rt.rotary(ROPE)
    message = str(info.value)
    assert "rotary" in message and "te: unavailable" in message


def test_strict_from_environment(monkeypatch):
    monkeypatch.setenv("CROSSCHIP_STRICT", "1")
    with pytest.raises(StrictFallbackError):
        Runtime("te", device="cpu").rotary(ROPE)
    monkeypatch.setenv("CROSSCHIP_STRICT", "maybe")
    with pytest.raises(ValueError, match="CROSSCHIP_STRICT='maybe'"):
        Runtime()


def test_explicit_reference_is_no_fallback_even_when_strict():
    rt = Runtime("reference", strict=True, device="cpu")
    assert rt.out_projection(LinearSpec(8, 8)).crosschip_component.backend == "reference"


def test_device_type_decline_is_recorded():
    rt = Runtime("torch", device="meta")
    with pytest.warns(CrosschipWarning, match="device type 'meta' not supported"):
        module = rt.qkv_projection(QKV)
    assert module.crosschip_component.backend == "reference"


def test_bad_dtype_and_mode():
    with pytest.raises(ConfigurationError, match="dtype='int3'"):
        Runtime(dtype="int3")
    with pytest.raises(ConfigurationError, match="mode='serve'"):
        Runtime(mode="serve")
@cpu_only
def test_report_summary_and_te_neuron_registered_unavailable():
    rt = Runtime(device="cpu")
    rt.qkv_projection(QKV)
    summary = rt.report.summary()
    assert summary["qkv_projection"][0]["backend"] == "torch"
    registry = rt.registry
    for name, hint in (("te", "transformer_engine"), ("neuron", "Neuron SDK")):
        probe = registry.backend(name).probe()
        assert not probe.available and hint in probe.reason
    assert registry.backend("neuron").descriptor.priority == 300
    assert registry.backend("te").descriptor.priority == 200
    assert registry.backend("torch").descriptor.priority == 100


def test_factory_must_return_module():
    from crosschip.plugins.descriptors import ComponentImpl

    rt = Runtime("torch", device="cpu")
    rt.registry.components[("torch", "rms_norm")] = ComponentImpl("torch", "rms_norm", lambda s, c: "nope")
    with pytest.raises(crosschip.errors.ComponentBuildError, match="built str for rms_norm"):
        rt.rms_norm(NormSpec(8))


def test_input_norm_identity_when_fused():
    from torch import nn

    rt = Runtime("reference", device="cpu")
    qkv = rt.qkv_projection(QKV)
    assert not isinstance(rt.input_norm(NormSpec(32), qkv), nn.Identity)
    object.__setattr__(qkv, "crosschip_component",
                       qkv.crosschip_component.__class__("qkv_projection", "x", QKV, fuses_input_norm=True))
    assert isinstance(rt.input_norm(NormSpec(32), qkv), nn.Identity)
    assert torch.is_tensor(qkv.q_proj.weight)


def _available_on_cpu(registry, name: str) -> None:
    """Make the built-in backend ``name`` look available on this CPU (its own descriptor otherwise:
    priority, fallbacks, declined kinds), as it would be on its hardware."""
    import dataclasses

    from crosschip import Probe
    from crosschip.plugins.registry import BackendRecord

    record = registry.backends[name]
    descriptor = dataclasses.replace(record.descriptor, device_types=("cpu",), probe=lambda: Probe(True))
    registry.backends[name] = BackendRecord(descriptor, record.plugin)


def _moe_spec():
    from crosschip.components.moe import MoESpec

    return MoESpec(32, 16, 4, 2)


def test_a_declined_kind_is_recorded_and_its_fallback_builds_it(monkeypatch):
    """te knows no MoE: the reason it declares shows as its decline, and its fallback (torch)
    builds the experts without a warning (a declared fallback is no reference fall-back)."""
    from crosschip.plugins.registry import get_registry, reset_registry
    from crosschip_te.plugin import MOE_DECLINE

    reset_registry()
    try:
        registry = get_registry()
        _available_on_cpu(registry, "te")
        rt = Runtime("te", device="cpu", registry=registry)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CrosschipWarning)
            module = rt.component("moe", _moe_spec())
        assert module.crosschip_component.backend == "torch"
        decision = rt.report.summary()["moe"][0]
        assert decision["backend"] == "torch"
        assert decision["declines"] == [{"backend": "te", "reason": MOE_DECLINE}], decision
    finally:
        reset_registry()


def test_strict_refuses_a_declined_kind_ending_on_reference_with_its_reason():
    """neuron has no fallback: its declared MoE decline ends on reference, which strict mode
    refuses naming neuron's reason (before, a kind a backend left out went to reference silently)."""
    from crosschip.plugins.registry import get_registry, reset_registry

    reset_registry()
    try:
        registry = get_registry()
        _available_on_cpu(registry, "neuron")
        with pytest.raises(StrictFallbackError, match=r"moe .* fell back to the reference backend \(neuron: "
                                                      r"neuronx-distributed's MoE layers"):
            Runtime("neuron", device="cpu", registry=registry, strict=True).component("moe", _moe_spec())
        with pytest.warns(CrosschipWarning, match="neuronx-distributed's MoE layers"):
            module = Runtime("neuron", device="cpu", registry=registry).component("moe", _moe_spec())
        assert module.crosschip_component.backend == "reference"
        # A kind neuron never declared stays no decline: rotary goes to reference quietly.
        with warnings.catch_warnings():
            warnings.simplefilter("error", CrosschipWarning)
            Runtime("neuron", device="cpu", registry=registry, strict=True).rotary(ROPE)
    finally:
        reset_registry()
