"""The template backend against itself: installed and discovered through its entry point, cheap to
register, numerically the reference's equal (crosschip's conformance kit), honest about what it
declines, and falling back for everything it does not implement.

Run with the package installed: ``pip install -e '.[test]' && pytest``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib import metadata

import pytest
import torch

import crosschip
from crosschip.testing import conformance

BACKEND = "template"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_discovered_through_its_entry_point():
    eps = {ep.name: ep for ep in metadata.entry_points(group="crosschip.backends")}
    assert BACKEND in eps, "crosschip-template is not installed (pip install -e plugins/crosschip-template)"
    assert eps[BACKEND].value == "crosschip_template.plugin"
    assert eps[BACKEND].dist.metadata["Name"] == "crosschip-template"


def test_registration_imports_neither_torch_nor_the_components():
    # crosschip imports the plugin module whenever it lists backends: it must stay cheap.
    code = ("import sys, crosschip_template.plugin; "
            "print(sorted(m for m in ('torch', 'crosschip_template.components') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_descriptor():
    descriptor = conformance.check_descriptor(BACKEND)
    assert (descriptor.priority, descriptor.device_types) == (50, ("cpu",))
    assert crosschip.Runtime().registry.components_of(BACKEND) == ["rms_norm"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", conformance.cases(BACKEND), ids=str)
def test_parity_with_reference(case, dtype):
    outcome = conformance.check_case(BACKEND, case, dtype=dtype)
    if case.spec.offset:  # Gemma's 1 + weight: this backend does not declare it handles offsets
        assert outcome.declined and "offset" in outcome.detail, outcome
        return
    assert outcome.status == conformance.PASSED


@pytest.mark.parametrize("case", conformance.cases(BACKEND), ids=str)
def test_layout_round_trip(case):
    outcome = conformance.check_layout(BACKEND, case)
    assert outcome.status == (conformance.DECLINED if case.spec.offset else conformance.PASSED), outcome


def test_whole_kit():
    report = conformance.check_backend(BACKEND)
    checked = {(o.check, str(o.case)) for o in report.passed}
    assert checked == {("descriptor", "None"),
                       ("parity", "rms_norm[hidden]"), ("layout", "rms_norm[hidden]"),
                       ("parity", "rms_norm[head-dim]"), ("layout", "rms_norm[head-dim]"),
                       ("parity", "rms_norm[projection]"), ("layout", "rms_norm[projection]")}
    assert {str(o.case) for o in report.declined} == {"rms_norm[offset]"}


def test_declines_float64_with_its_reason():
    case = conformance.cases(BACKEND)[0]
    outcome = conformance.check_case(BACKEND, case, dtype=torch.float64)
    assert outcome.declined and "float64" in outcome.detail

    rt = crosschip.Runtime(components={"rms_norm": BACKEND}, device="cpu", dtype=torch.float64)
    with pytest.warns(crosschip.CrosschipWarning, match="template: float64: torch.nn.functional.rms_norm"):
        norm = rt.rms_norm(crosschip.NormSpec(16))
    assert norm.crosschip_component.backend == "reference"


def test_builds_rms_norm_and_falls_back_for_the_rest():
    rt = crosschip.Runtime(BACKEND, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not implementing a component is no fallback warning
        norm = rt.rms_norm(crosschip.NormSpec(16))
        qkv = rt.qkv_projection(crosschip.QKVSpec(16, 2, 1, 8))
    assert norm.crosschip_component.backend == BACKEND
    assert type(norm).__name__ == "FusedRMSNorm"
    assert qkv.crosschip_component.backend == "reference"
    assert rt.chain("qkv_projection").backends == (BACKEND, "reference")
