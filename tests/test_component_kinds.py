"""Component kinds: one definition each (crosschip.components), the registry of kinds, and a kind
added by an out-of-tree plugin (plugins/crosschip-layerscale) used like a built-in one."""

from __future__ import annotations

import types

import pytest
import torch

from crosschip import CausalLM, Runtime
from crosschip.components import BUILTIN, SPLITS
from crosschip.errors import UnknownNameError
from crosschip.plugins import hookimpl
from crosschip.plugins.registry import LOADED, PluginRecord, Registry, get_registry, reset_registry
from crosschip.testing import conformance
from plugin_site import ROOT, cpu_only, subprocess_environ


@pytest.fixture
def layerscale(kind_plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(kind_plugin_site))
    reset_registry()
    yield
    reset_registry()


def test_every_builtin_kind_is_complete():
    """Each kind's own declarations agree with each other: its cases build specs of its spec
    class, its examples feed its call contract on its reference module, and its split is known."""
    rt = Runtime("reference", device="cpu")
    for kind in BUILTIN:
        cases = kind.cases()
        assert cases, kind.name
        for label, spec, options in cases:
            assert isinstance(spec, kind.spec), (kind.name, label)
            assert kind.tensor_parallel(spec) in SPLITS, (kind.name, label)
            module = rt.component(kind.name, spec)
            roles = kind.weights(spec)
            assert all(len(shape) >= 1 for shape in roles.values())
            helpers = {name: rt.build(k, s) for name, (k, s) in kind.helpers(spec).items()}
            example = kind.example(spec, options, torch.Generator().manual_seed(0))
            outputs = kind.call(module, example.inputs, helpers)
            assert outputs and all(torch.is_tensor(o) for o in outputs), (kind.name, label)


def test_a_spec_of_another_kind_is_refused_by_name():
    from crosschip.specs import NormSpec

    with pytest.raises(Exception, match="attention takes a AttentionSpec, found NormSpec"):
        Runtime("reference", device="cpu").component("attention", NormSpec(8))


def _module_plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, value in hooks.items():
        setattr(module, hook, hookimpl(lambda value=value: value))
    return module


def test_a_kind_colliding_with_a_builtin_makes_its_plugin_incompatible():
    from crosschip import BackendDescriptor, Probe

    registry = Registry()
    kind = next(k for k in BUILTIN if k.name == "attention")
    plugin = _module_plugin(
        "clash", crosschip_register_backends=[BackendDescriptor("clash", 1, ("cpu",), lambda: Probe(True))],
        crosschip_register_component_kinds=[kind])
    record = PluginRecord("clash", "module", "clash")
    registry.add_plugin(record, plugin)
    assert record.status == "incompatible"
    assert record.reason == "registers component kind 'attention', which 'crosschip' already defines"


def test_a_plugin_kind_is_listed_resolved_and_checked(layerscale):
    registry = get_registry()
    assert registry.plugins["layerscale"].status == LOADED
    assert registry.component_names()[-1] == "layer_scale"  # after the built-in kinds
    # The reference backend builds every kind with the kind's own reference implementation.
    assert registry.components_of("reference")[-1] == "layer_scale"
    assert registry.components_of("layerscale") == ["layer_scale"]
    report = conformance.check_backend("layerscale")
    assert len(report.passed) == 1 + 2 * 2 and not report.failed
    with pytest.raises(UnknownNameError, match="layer_scale"):
        Runtime(components={"layerscale_typo": "reference"})


@cpu_only
def test_a_model_with_a_plugin_kind_saves_and_loads_its_weight(layerscale, tmp_path):
    """A model file using the plugin's kind: auto resolution builds it on the plugin's backend
    (the only one implementing it), the weight keeps its Hugging Face name, and a model built on
    the reference backend loads the saved weights bitwise."""
    from crosschip_layerscale.kind import LayerScaleSpec

    class Scaled(CausalLM):
        def __init__(self, config, runtime):
            super().__init__(config, runtime)
            self.scale = runtime.component("layer_scale", LayerScaleSpec(8, init=0.25))

    built = Scaled(None, Runtime(device="cpu"))
    assert built.scale.crosschip_component.backend == "layerscale"
    assert list(built.state_dict()) == ["scale.gamma"]  # its physical name
    with torch.no_grad():
        built.scale.gamma.copy_(torch.arange(8.0))
    canonical = built.hf_state_dict()
    assert list(canonical) == ["scale.weight"]
    other = Scaled(None, Runtime("reference", device="cpu"))
    other.load_hf_state_dict(canonical)
    assert torch.equal(other.scale.weight, torch.arange(8.0))
    x = torch.randn(2, 8)
    torch.testing.assert_close(built.scale(x), other.scale(x))


def test_the_plugin_passes_its_own_tests(kind_plugin_site):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "plugins" / "crosschip-layerscale")],
        capture_output=True, text=True, env=subprocess_environ(kind_plugin_site), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "3 passed" in summary and not any(w in summary for w in ("skipped", "failed", "error")), summary


def test_the_docs_table_lists_every_builtin_kind_with_its_spec_and_file():
    import re

    text = (ROOT / "docs" / "components.md").read_text()
    table = text.split("## The built-in kinds")[1].split("## ")[0]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| .* \| `components/(\w+)\.py` \|$", table, re.M)
    assert {name: spec for name, spec, _ in rows} == {k.name: k.spec.__name__ for k in BUILTIN}
    import crosschip.components as package

    for name, _, module in rows:
        declared = next(k for k in BUILTIN if k.name == name)
        assert declared.spec.__module__ == f"{package.__name__}.{module}", name
