"""The conformance kit (crosschip.testing.conformance): the built-in backends pass it, and it fails
backends that are wrong in ways only one of its checks can see."""

from __future__ import annotations

import time

import pytest
import torch

from crosschip import BackendDescriptor, ComponentImpl, ConfigurationError, LayoutImpl, Probe, hookimpl
from crosschip.weights.layouts import Chain, Concat, Transform
from crosschip.plugins.loader import load_registry
from crosschip.plugins.registry import PluginRecord
from crosschip.specs import COMPONENTS
from crosschip.testing import conformance
from crosschip.testing.conformance import ConformanceError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TORCH_COMPONENTS = ["embedding", "qkv_projection", "out_projection", "gated_mlp", "mlp", "moe", "linear", "rms_norm",
                    "layer_norm", "attention", "lm_head",
                    "loss"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_builtin_backends_conform(backend, dtype):
    report = conformance.check_backend(backend, dtype=dtype)
    cases = conformance.cases(backend)
    assert {c.component for c in cases} == set(TORCH_COMPONENTS if backend == "torch" else COMPONENTS)
    # Every case ran (none declined): a descriptor check plus parity and layout per case.
    assert (len(report.passed), report.declined, report.failed) == (1 + 2 * len(cases), [], [])


@pytest.mark.parametrize("case", [c for comp in TORCH_COMPONENTS for c in conformance.default_cases(comp)], ids=str)
def test_torch_backend_case_by_case(case):
    assert conformance.check_case("torch", case).status == conformance.PASSED
    assert conformance.check_layout("torch", case).status == conformance.PASSED


def test_descriptor_of_builtins():
    assert conformance.check_descriptor("torch").priority == 100
    assert conformance.check_descriptor("te").device_types == ("cuda",)  # unavailable, still well formed
    with pytest.raises(ConformanceError, match="backend 'tpu' is not registered; registered: neuron, reference"):
        conformance.check_descriptor("tpu")


def test_unknown_or_unimplemented_component():
    with pytest.raises(ConfigurationError, match="torch' does not implement rotary; it implements embedding, qkv_projection"):
        conformance.cases("torch", ["rotary"])
    with pytest.raises(ConfigurationError, match="unknown component 'flash'"):
        conformance.cases("torch", ["flash"])


# -- backends that are wrong on purpose -------------------------------------------------------
class _Plugin:
    """A backend registered straight into a registry (the kit's subject here, not plugin loading)."""

    def __init__(self, name, components=(), layouts=(), probe=lambda: Probe(True, "test")):
        self.name, self.components, self.layouts, self.probe = name, list(components), list(layouts), probe

    @hookimpl
    def crosschip_register_backends(self):
        return [BackendDescriptor(self.name, 10, ("cpu",), self.probe)]

    @hookimpl
    def crosschip_register_components(self):
        return self.components

    @hookimpl
    def crosschip_register_layouts(self):
        return self.layouts


def _registry_with(plugin: _Plugin):
    registry = load_registry()
    record = PluginRecord(plugin.name, "module", "tests.test_conformance")
    registry.add_plugin(record, plugin)
    assert record.usable, record.reason
    return registry


def _reference_norm(spec, ctx):
    from crosschip.reference.components import RMSNorm

    return RMSNorm(spec)


def test_catches_a_layout_that_round_trips_but_does_not_match_the_module():
    # The torch backend's combined QKV module, with q, k and v simply concatenated instead of
    # grouped per KV head: exactly reversible, so only parity can tell.
    def concat_layout(spec, ctx):
        sizes = (spec.q_size, spec.kv_size, spec.kv_size)
        return Chain.of(Concat(("q.weight", "k.weight", "v.weight"), "weight", sizes),
                        Concat(("q.bias", "k.bias", "v.bias"), "bias", sizes))

    def combined(spec, ctx):
        from crosschip_torch.components import CombinedQKV

        return CombinedQKV(spec)

    registry = _registry_with(_Plugin("concat_qkv", [ComponentImpl("concat_qkv", "qkv_projection", combined)],
                                      [LayoutImpl("concat_qkv", "qkv_projection", concat_layout)]))
    gqa = conformance.default_cases("qkv_projection")[0]
    assert conformance.check_layout("concat_qkv", gqa, registry=registry).status == conformance.PASSED
    with pytest.raises(ConformanceError, match=r"concat_qkv' qkv_projection\[gqa\] .*output 0: relative error"):
        conformance.check_case("concat_qkv", gqa, registry=registry)
    with pytest.raises(ConformanceError, match=r"parity qkv_projection\[gqa\]: failed"):
        conformance.check_backend("concat_qkv", registry=registry)


class _Bfloat16OnTheWay(Transform):
    def apply(self, tensors):
        return {k: v.to(torch.bfloat16).to(v.dtype) for k, v in tensors.items()}

    def invert(self, tensors):
        return dict(tensors)


def test_catches_a_lossy_layout():
    registry = _registry_with(_Plugin("lossy", [ComponentImpl("lossy", "rms_norm", _reference_norm)],
                                      [LayoutImpl("lossy", "rms_norm", lambda spec, ctx: _Bfloat16OnTheWay())]))
    case = conformance.default_cases("rms_norm")[0]
    with pytest.raises(ConformanceError, match="round trip of 'weight' is not bitwise identical"):
        conformance.check_layout("lossy", case, registry=registry)


def test_catches_parameters_the_layout_does_not_name():
    def scale_norm(spec, ctx):
        module = torch.nn.Module()
        module.scale = torch.nn.Parameter(torch.ones(spec.hidden_size))
        return module

    registry = _registry_with(_Plugin("misnamed", [ComponentImpl("misnamed", "rms_norm", scale_norm)]))
    case = conformance.default_cases("rms_norm")[0]
    with pytest.raises(ConformanceError, match=r"layout gives physical keys \['weight'\], the module holds \['scale'\]"):
        conformance.check_layout("misnamed", case, registry=registry)


class _SkewedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.001


def test_catches_a_wrong_gradient_with_a_right_output():
    def skewed_norm(spec, ctx):
        from crosschip.reference.components import RMSNorm

        class Skewed(RMSNorm):
            def forward(self, x):
                return super().forward(_SkewedGradient.apply(x))

        return Skewed(spec)

    registry = _registry_with(_Plugin("skewed", [ComponentImpl("skewed", "rms_norm", skewed_norm)]))
    case = conformance.default_cases("rms_norm")[0]
    with pytest.raises(ConformanceError) as info:
        conformance.check_case("skewed", case, registry=registry)
    message = str(info.value)
    assert "gradient of input 'x': relative error" in message
    assert "output" not in message and "gradient of weight" not in message


def test_declines_are_reported_not_passed():
    registry = _registry_with(_Plugin("picky", [ComponentImpl(
        "picky", "rms_norm", _reference_norm, supports=lambda spec, ctx: f"hidden size {spec.hidden_size} is odd to me")]))
    case = conformance.default_cases("rms_norm")[0]
    outcome = conformance.check_case("picky", case, registry=registry)
    assert (outcome.status, outcome.detail) == (conformance.DECLINED, "hidden size 32 is odd to me")
    report = conformance.check_backend("picky", registry=registry)
    assert [o.check for o in report.passed] == ["descriptor"]
    assert len(report.declined) == 2 * len(conformance.default_cases("rms_norm"))


def test_catches_bad_probes():
    registry = _registry_with(_Plugin("boolprobe", probe=lambda: True))
    with pytest.raises(ConformanceError, match="probe returned bool, expected crosschip.Probe"):
        conformance.check_descriptor("boolprobe", registry=registry)

    def slow():
        time.sleep(0.05)
        return Probe(True, "slow")

    registry = _registry_with(_Plugin("slowprobe", probe=slow))
    with pytest.raises(ConformanceError, match=r"probe took 0\.\d\ds \(budget 0.01s\)"):
        conformance.check_descriptor("slowprobe", registry=registry, probe_budget_s=0.01)


def test_tolerance_is_derived_from_the_dtype():
    assert conformance.tolerance_for(torch.float32) < conformance.tolerance_for(torch.float16) < \
        conformance.tolerance_for(torch.bfloat16)
    with pytest.raises(ConfigurationError, match="no conformance tolerance for torch.int8"):
        conformance.tolerance_for(torch.int8)


# -- a backend that fuses the input norm into its projection -----------------------------------
def _fused_qkv_plugin(name: str, apply_norm: bool) -> _Plugin:
    def build(spec, ctx):
        from crosschip.reference.components import QKVProjection, RMSNorm

        class NormQKV(torch.nn.Module):
            """Holds the input norm (as TE's LayerNormLinear does) and the projections."""

            def __init__(self):
                super().__init__()
                self.norm = RMSNorm(spec.input_norm)
                self.proj = QKVProjection(spec)

            def forward(self, hidden):
                return self.proj(self.norm(hidden) if apply_norm else hidden)

        return NormQKV()

    def layout(spec, ctx):
        from crosschip.weights.layouts import Rename

        return Rename.of(**{"norm.weight": "norm.weight"},
                         **{f"{r}.weight": f"proj.{r}_proj.weight" for r in "qkv"})

    return _Plugin(name, [ComponentImpl(name, "qkv_projection", build, fuses_input_norm=True,
                                        supports=lambda spec, ctx: None if spec.input_norm else "needs input_norm")],
                   [LayoutImpl(name, "qkv_projection", layout)])


def test_fused_input_norm_is_compared_with_norm_then_projection():
    case = next(c for c in conformance.default_cases("qkv_projection") if c.label == "input-norm")
    good = _registry_with(_fused_qkv_plugin("fused", apply_norm=True))
    assert conformance.check_case("fused", case, registry=good).status == conformance.PASSED
    assert conformance.check_layout("fused", case, registry=good).status == conformance.PASSED

    forgetful = _registry_with(_fused_qkv_plugin("forgetful", apply_norm=False))
    assert conformance.check_layout("forgetful", case, registry=forgetful).status == conformance.PASSED
    with pytest.raises(ConformanceError) as info:
        conformance.check_case("forgetful", case, registry=forgetful)
    # The norm weight is unused, so its canonical gradient is missing, and the outputs differ.
    assert "output 0: relative error" in str(info.value)
    assert "gradient of weight 'norm.weight': missing on the backend" in str(info.value)


def test_probe_checked_in_a_fresh_interpreter():
    """Where CUDA is already up, the kit re-runs a probe in a new interpreter to see whether it
    initialises CUDA; that check itself works (here on the torch backend, which never does)."""
    from crosschip.testing.conformance import _probe_initialises_cuda_afresh

    assert _probe_initialises_cuda_afresh("torch") is False
    with pytest.raises(ConformanceError, match="(?s)probing it in a fresh interpreter failed: .*KeyError"):
        _probe_initialises_cuda_afresh("no_such_backend")
