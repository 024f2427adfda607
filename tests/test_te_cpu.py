"""The te backend on a machine without it: registered, unavailable with the reason, its weight
transforms round-trip bitwise (plain tensor functions), and FP8 is never silently dropped."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosschip import ConfigurationError, GatedMLPSpec, LinearSpec, NormSpec, QKVSpec, Runtime
from crosschip.layouts import canonical_shapes
from crosschip.plugins.descriptors import resolve_callable
from crosschip.plugins.registry import get_registry


def _layout(component, spec):
    return resolve_callable(get_registry().layouts[("te", component)].transform)(spec, None)


def _random(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@settings(max_examples=25, deadline=None)
@given(kv=st.integers(1, 4), group=st.sampled_from([1, 2, 7]), head_dim=st.sampled_from([2, 4, 8]),
       hidden=st.sampled_from([8, 16]), bias=st.booleans(), norm=st.booleans())
def test_qkv_round_trip_and_names(kv, group, head_dim, hidden, bias, norm):
    spec = QKVSpec(hidden, kv * group, kv, head_dim, bias=bias, input_norm=NormSpec(hidden) if norm else None)
    canonical = _random(canonical_shapes("qkv_projection", spec, fuses_input_norm=True))
    physical = _layout("qkv_projection", spec).apply(canonical)
    expected = {"proj.weight"} | ({"proj.bias"} if bias else set()) | ({"proj.layer_norm_weight"} if norm else set())
    assert set(physical) == expected
    back = _layout("qkv_projection", spec).invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


@settings(max_examples=25, deadline=None)
@given(hidden=st.sampled_from([8, 16]), inter=st.integers(1, 12), bias=st.booleans())
def test_gated_mlp_is_gate_then_up_halves(hidden, inter, bias):
    spec = GatedMLPSpec(hidden, inter, bias=bias, input_norm=NormSpec(hidden))
    canonical = _random(canonical_shapes("gated_mlp", spec, fuses_input_norm=True))
    layout = _layout("gated_mlp", spec)
    physical = layout.apply(canonical)
    assert torch.equal(physical["mlp.fc1_weight"][:inter], canonical["gate.weight"])
    assert torch.equal(physical["mlp.fc1_weight"][inter:], canonical["up.weight"])
    assert torch.equal(physical["mlp.fc2_weight"], canonical["down.weight"])
    assert torch.equal(physical["mlp.layer_norm_weight"], canonical["norm.weight"])
    back = layout.invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


def test_linear_and_norm_round_trip():
    for component, spec in (("out_projection", LinearSpec(8, 4, bias=True)), ("rms_norm", NormSpec(8))):
        canonical = _random(canonical_shapes(component, spec))
        layout = _layout(component, spec)
        back = layout.invert(layout.apply(canonical))
        assert all(torch.equal(back[k], canonical[k]) for k in canonical)


def test_registered_and_unavailable_with_reason():
    record = get_registry().backend("te")
    assert record.descriptor.priority == 200 and "fp8" in record.descriptor.precisions
    assert set(get_registry().components_of("te")) == {
        "qkv_projection", "gated_mlp", "out_projection", "rms_norm", "attention"}
    probe = record.probe()
    assert not probe.available and "transformer_engine is not installed" in probe.reason


@pytest.mark.parametrize("backend", ["te", "torch", None])
def test_fp8_without_an_fp8_backend_is_an_error(backend):
    with pytest.raises(ConfigurationError, match="precision='fp8' needs a backend that implements FP8") as info:
        Runtime(backend, device="cpu", dtype="bf16", precision="fp8")
    assert "never replaced by a silent bf16 run" in str(info.value)
    if backend == "te":
        assert "te: unavailable: transformer_engine is not installed" in str(info.value)


def test_bad_precision_names():
    with pytest.raises(ConfigurationError, match="precision='int4'"):
        Runtime(precision="int4")
    with pytest.raises(ConfigurationError, match="fp8_recipe='fancy'"):
        Runtime(fp8_recipe="fancy")


def test_fp8_projection_on_a_backend_without_fp8_warns_or_fails_in_strict():
    """If an FP8 run's projection ends on a backend without FP8, it is never silent."""
    from crosschip import CrosschipWarning, StrictFallbackError
    from crosschip.plugins.descriptors import Probe

    registry = get_registry()
    te = registry.backend("te")
    te._probe = Probe(True, "pretend available, to reach the build")
    rt = Runtime("te", components={"out_projection": "torch"}, device="cpu", dtype="bf16", precision="fp8",
                 registry=registry)
    with pytest.warns(CrosschipWarning, match="out_projection .* was built by 'torch', which has no FP8"):
        rt.out_projection(LinearSpec(16, 16))
    strict = Runtime("te", components={"out_projection": "torch"}, device="cpu", dtype="bf16",
                     precision="fp8", registry=registry, strict=True)
    with pytest.raises(StrictFallbackError, match="computes in torch.bfloat16"):
        strict.out_projection(LinearSpec(16, 16))
