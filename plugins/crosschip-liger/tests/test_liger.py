"""The liger backend on any machine (CPU CI included): installed and discovered through its entry
point, cheap to register, honest about why it is unavailable and what it declines, falling
through to the next backend, and its layouts exactly reversible. The kernels themselves run in
test_liger_cuda.py.

Run with the package installed: ``pip install -e '.[test]' && pytest -m "not cuda"``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from importlib import metadata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crosschip
from crosschip import GatedMLPSpec, LossSpec, NormSpec, ParallelSpec, RopeSpec
from crosschip.testing import conformance
from crosschip_liger import layout, support
from crosschip_liger.plugin import NOT_INSTALLED, probe

BACKEND = "liger"
COMPONENTS = ["gated_mlp", "rms_norm", "rotary", "loss"]  # in the kinds' order
ROPE = RopeSpec(8, 64, (("rope_theta", 10000.0), ("rope_type", "default")))


def expected_reason() -> str:
    """Why the backend is unavailable here, from what is installed (the probe's checks, in order)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return NOT_INSTALLED
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (liger-kernel's kernels are Triton kernels)"
    return "no CUDA device visible to torch (liger-kernel's Triton kernels run on GPUs)"


needs_unavailable = pytest.mark.skipif(probe().available, reason="the liger backend is available here")


def test_discovered_through_its_entry_point():
    eps = {ep.name: ep for ep in metadata.entry_points(group="crosschip.backends")}
    assert BACKEND in eps, "crosschip-liger is not installed (pip install -e plugins/crosschip-liger)"
    assert eps[BACKEND].value == "crosschip_liger.plugin"
    assert eps[BACKEND].dist.metadata["Name"] == "crosschip-liger"
    record = crosschip.Runtime().registry.plugins[BACKEND]
    assert (record.status, record.distribution, record.version) == ("loaded", "crosschip-liger", "0.1.0")


def test_registration_and_probe_import_neither_liger_nor_the_components():
    # crosschip imports the plugin module and runs the probe whenever it lists backends.
    code = ("import sys, crosschip_liger.plugin as p; p.probe(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('liger_kernel', 'triton') "
            "or m.startswith('crosschip_liger.') and m != 'crosschip_liger.plugin'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_descriptor_and_registrations():
    # The kit's descriptor check: well formed, a cheap probe that initialises no device, every
    # support check and layout resolving (the factories import liger_kernel only when called).
    descriptor = conformance.check_descriptor(BACKEND)
    assert (descriptor.priority, descriptor.device_types, descriptor.fallbacks) == (150, ("cuda",), ())
    registry = crosschip.Runtime().registry
    assert registry.components_of(BACKEND) == COMPONENTS
    assert sorted(c for b, c in registry.layouts if b == BACKEND) == ["gated_mlp", "rms_norm"]


@needs_unavailable
def test_unavailable_with_its_reason():
    result = probe()
    assert (result.available, result.reason) == (False, expected_reason())


@needs_unavailable
def test_cli_lists_it_with_its_reason():
    out = subprocess.run([sys.executable, "-m", "crosschip.cli", "backends", "--json"], capture_output=True,
                         text=True, check=True, timeout=120)
    rows = {row["name"]: row for row in json.loads(out.stdout)["backends"]}
    liger = rows[BACKEND]
    assert {k: liger[k] for k in ("distribution", "version", "status", "priority", "reason")} == {
        "distribution": "crosschip-liger", "version": "0.1.0", "status": "unavailable", "priority": 150,
        "reason": expected_reason()}
    assert liger["components"] == COMPONENTS
    text = subprocess.run([sys.executable, "-m", "crosschip.cli", "backends"], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    assert expected_reason() in text and "crosschip-liger" in text


@needs_unavailable
@pytest.mark.parametrize("component", COMPONENTS)
def test_auto_leaves_it_out_and_a_request_falls_through_with_its_reason(component):
    rt = crosschip.Runtime(device="cpu")
    assert BACKEND not in rt.chain(component).backends
    case = conformance.default_cases(component)[0]
    requested = crosschip.Runtime(BACKEND, device="cpu")
    with pytest.warns(crosschip.CrosschipWarning, match=f"liger: unavailable: {expected_reason()[:20]}"):
        module = requested.build(component, case.spec)
    assert module.crosschip_component.backend == "reference"
    with pytest.raises(crosschip.StrictFallbackError, match="liger: unavailable"):
        crosschip.Runtime(components={component: BACKEND}, device="cpu", strict=True).build(component, case.spec)


@pytest.mark.parametrize("case", conformance.cases(BACKEND), ids=str)
def test_the_kit_declines_every_case_on_cpu_with_the_reason(case):
    # On a CPU runtime: unavailable (CPU CI), or where the backend is available, not a CPU backend.
    outcome = conformance.check_case(BACKEND, case, device="cpu")
    result = probe()
    expected = (f"unavailable: {result.reason}" if not result.available
                else "device type 'cpu' not supported (supports cuda)")
    assert (outcome.status, outcome.detail) == (conformance.DECLINED, expected)
    assert conformance.check_layout(BACKEND, case, device="cpu").detail == expected


# -- what it declines (asked only where the backend is available; the checks are pure Python) ----
def context(dtype=torch.bfloat16, tp: int = 1):
    """The two fields of a BuildContext the support checks read."""
    return types.SimpleNamespace(dtype=dtype, parallel=ParallelSpec(tp=tp))


def _llama3_rope() -> RopeSpec:
    return next(case.spec for case in conformance.default_cases("rotary") if case.label == "llama3")


ACCEPTED = [
    ("rms_norm", NormSpec(4096)),
    ("rms_norm", NormSpec(32, offset=1.0)),  # Gemma's 1 + weight: Liger's offset argument
    ("rms_norm", NormSpec(32, offset=0.5)),
    ("rms_norm", NormSpec(8, scope="head")),
    ("rms_norm", NormSpec(65536)),
    ("gated_mlp", GatedMLPSpec(32, 64)),
    ("gated_mlp", GatedMLPSpec(32, 64, activation="swish", bias=True)),
    ("gated_mlp", GatedMLPSpec(32, 64, input_norm=NormSpec(32))),  # the norm is built separately
    ("rotary", ROPE),
    ("rotary", _llama3_rope()),
    ("loss", LossSpec(128256)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("component, spec", ACCEPTED, ids=lambda v: v if isinstance(v, str) else "")
def test_accepts(component, spec, dtype):
    assert getattr(support, component)(spec, context(dtype)) is None


@pytest.mark.parametrize("component, spec", ACCEPTED, ids=lambda v: v if isinstance(v, str) else "")
def test_declines_tensor_parallelism_and_float64(component, spec):
    reason = getattr(support, component)(spec, context(tp=2))
    assert reason.startswith("tensor parallelism (tp=2): crosschip-liger builds single-device modules")
    reason = getattr(support, component)(spec, context(torch.float64))
    assert reason.startswith("dtype torch.float64: crosschip-liger builds Liger's Triton kernels for bfloat16")


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_declines_activations_other_than_silu(activation):
    reason = support.gated_mlp(GatedMLPSpec(32, 64, activation=activation), context())
    assert reason == (f"activation {activation!r}: crosschip-liger builds Liger's SwiGLU kernel "
                      "(LigerFusedGateUpSiLUMulFunction), which gates with SiLU only (silu, swish)")


def test_declines_rows_wider_than_one_triton_block():
    assert support.rms_norm(NormSpec(65537), context()) == (
        "hidden size 65537: Liger's kernels hold a whole row in one Triton block of at most 65536 elements")
    assert support.gated_mlp(GatedMLPSpec(1024, 70000), context()).startswith("intermediate size 70000: ")


def test_declines_a_rope_type_without_tables_naming_it():
    spec = RopeSpec(8, 64, (("rope_theta", 10000.0), ("rope_type", "no_such_rope")))
    reason = support.rotary(spec, context())
    assert reason.startswith("rope_type 'no_such_rope' is not supported by this transformers version")


# -- layouts: canonical -> physical -> canonical, bitwise ------------------------------------------
_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(1, 24), intermediate=st.integers(1, 40), bias=st.booleans(), dtype=_DTYPES,
       seed=st.integers(0, 2**16))
def test_gated_mlp_layout_round_trips_bitwise(hidden, intermediate, bias, dtype, seed):
    spec = GatedMLPSpec(hidden, intermediate, bias=bias)
    gen = torch.Generator().manual_seed(seed)
    canonical = {role: torch.randn(shape, generator=gen).to(dtype)
                 for role, shape in crosschip.Runtime().registry.kind("gated_mlp").weights(spec).items()}
    transform = layout.gated_mlp_layout(spec)
    physical = transform.apply(dict(canonical))
    expected = {"gate_up_proj.weight": (2 * intermediate, hidden), "down_proj.weight": (hidden, intermediate)}
    if bias:
        expected.update({"gate_up_proj.bias": (2 * intermediate,), "down_proj.bias": (hidden,)})
    assert {k: tuple(v.shape) for k, v in physical.items()} == expected
    # Gate in the first half of gate_up_proj, up in the second: what Liger's kernel reads.
    assert torch.equal(physical["gate_up_proj.weight"][:intermediate], canonical["gate.weight"])
    assert torch.equal(physical["gate_up_proj.weight"][intermediate:], canonical["up.weight"])
    back = transform.invert(physical)
    assert set(back) == set(canonical)
    for role, tensor in canonical.items():
        assert back[role].dtype == tensor.dtype and torch.equal(back[role], tensor), role


def test_rms_norm_layout_is_the_canonical_role():
    weight = torch.randn(16)
    transform = layout.rms_norm_layout(NormSpec(16))
    assert transform.invert(transform.apply({"weight": weight}))["weight"] is weight
