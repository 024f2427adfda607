"""The plugin's kind through crosschip's conformance kit, and a model asking for it."""

from __future__ import annotations

import pytest
import torch

import crosschip
from crosschip.testing import conformance
from crosschip_layerscale.kind import LayerScaleSpec


def test_kind_is_registered_and_conforms():
    assert "layer_scale" in crosschip.Runtime().registry.component_names()
    report = conformance.check_backend("layerscale")
    assert {str(o.case) for o in report.passed if o.case} == {"layer_scale[hidden]", "layer_scale[heads]"}
    assert report.declined == []


@pytest.mark.parametrize("backend", ["layerscale", "reference"])
def test_runtime_builds_it_by_kind(backend):
    rt = crosschip.Runtime(backend, device="cpu")
    module = rt.component("layer_scale", LayerScaleSpec(16, init=0.5))
    assert module.crosschip_component.backend == backend
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(module(x), 0.5 * x)
