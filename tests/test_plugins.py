"""Plugin loading against real installed packages (see plugin_site.py): discovery, isolation of
broken plugins, strict mode, resolution precedence and the environment controls.

The packages are discovered through importlib.metadata entry points, never registered by calling
functions. Most tests run in-process with the install directory on ``sys.path``; the command line
runs in subprocesses in test_cli.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import crosschip
from crosschip import (
    PLUGIN_API_VERSION,
    ConfigurationError,
    CrosschipWarning,
    NormSpec,
    PluginError,
    QKVSpec,
    RopeSpec,
    Runtime,
    StrictFallbackError,
    UnknownNameError,
)
from crosschip.plugins.registry import get_registry, reset_registry
from helpers import assert_rel_close, save_hf_llama
from plugin_site import BROKEN, BROKEN_IMPORT_ERROR, ROOT, clean_environ, cpu_only, subprocess_environ

NORM = NormSpec(32)
QKV = QKVSpec(32, 4, 2, 8)
ROPE = RopeSpec(8, 64, (("rope_theta", 10000.0), ("rope_type", "default")))
TE_REASON = "transformer_engine is not installed"


@pytest.fixture
def installed(plugin_site, monkeypatch):
    """The plugin packages on sys.path, no crosschip environment variable set, a fresh registry."""
    for var in set(os.environ) - set(clean_environ()):  # the CROSSCHIP_* settings of the caller
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(plugin_site))
    reset_registry()
    return monkeypatch


def _built_by(rt: Runtime, component: str) -> tuple[str, str]:
    """(backend, source) of the last decision for ``component``."""
    decision = [d for d in rt.report.decisions if d.component == component][-1]
    return decision.backend, decision.source


# -- discovery and isolation ----------------------------------------------------------------------
def test_discovers_packages_with_distribution_and_version(installed):
    registry = get_registry()
    template = registry.plugins["template"]
    assert (template.source, template.value, template.distribution, template.version, template.status) == (
        "entry point", "crosschip_template.plugin", "crosschip-template", "0.1.0", "loaded")
    assert registry.backend("template").descriptor.priority == 50
    assert registry.components_of("template") == ["rms_norm"]
    assert (registry.plugins["torch"].distribution, registry.plugins["torch"].status) == ("crosschip", "loaded")
    versions = {name: (registry.plugins[name].distribution, registry.plugins[name].version) for name in BROKEN}
    assert versions == {"broken_import": ("crosschip-broken-import", "0.0.1"),
                        "unknown_hook": ("crosschip-unknown-hook", "0.3.0"),
                        "wrong_api": ("crosschip-wrong-api", "2.0.0")}


def test_plugin_that_fails_to_import_is_failed_with_the_import_error(installed):
    registry = get_registry()
    record = registry.plugins["broken_import"]
    assert (record.status, record.reason) == ("failed", BROKEN_IMPORT_ERROR)
    assert "broken_import" not in registry.backends


def test_wrong_plugin_api_is_incompatible_naming_both_versions(installed):
    registry = get_registry()
    record = registry.plugins["wrong_api"]
    assert record.status == "incompatible"
    assert record.reason == (f"backend 'wrong_api' declares plugin API version 999, this crosschip "
                             f"supports version {PLUGIN_API_VERSION}")
    # Its priority-900 rms_norm must not leak into resolution.
    assert "wrong_api" not in registry.backends
    assert not any(backend == "wrong_api" for backend, _ in registry.components)
    assert registry.pm.get_plugin("wrong_api") is None


def test_unknown_hook_is_incompatible_naming_the_hook(installed):
    registry = get_registry()
    record = registry.plugins["unknown_hook"]
    assert record.status == "incompatible"
    assert record.reason.startswith("implements unknown hook(s) crosschip_register_kernels; known hooks: ")
    assert "unknown_hook" not in registry.backends
    assert registry.pm.get_plugin("unknown_hook") is None


def test_requesting_a_broken_plugin_names_its_problem(installed):
    with pytest.raises(ConfigurationError, match="backend 'wrong_api' \\(from argument\\) cannot be used: "
                                                 "its plugin is incompatible: .*version 999"):
        Runtime("wrong_api")
    with pytest.raises(ConfigurationError, match="backend 'broken_import' \\(from argument components\\['rms_norm'\\]\\) "
                                                 "cannot be used: its plugin is failed: import failed: ModuleNotFoundError"):
        Runtime(components={"rms_norm": "broken_import"})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    hf = save_hf_llama(path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(ids).logits
    return path, ids, logits


@pytest.mark.parametrize("backend", [None, "reference", "torch"])
def test_every_other_backend_keeps_working(installed, tiny_llama, backend):
    path, ids, expected = tiny_llama
    model = crosschip.from_pretrained(path, backend=backend, device="cpu")
    with torch.no_grad():
        assert_rel_close(model(ids).logits, expected, 2e-5, "logits")
    built = {d.component: d.backend for d in model.runtime.report.decisions}
    if backend is None:  # auto: torch (priority 100) before the template (50), then reference
        assert built == {"embedding": "torch", "qkv_projection": "torch", "attention": "torch",
                         "out_projection": "torch", "gated_mlp": "torch", "rms_norm": "torch",
                         "rotary": "reference", "lm_head": "torch", "loss": "torch"}
    else:
        assert built["rms_norm"] == backend and built["qkv_projection"] == backend


# -- strict mode ------------------------------------------------------------------------------------
def test_strict_turns_plugin_problems_into_an_error(installed):
    Runtime()  # not strict: the broken plugins are only reported
    with pytest.raises(PluginError) as info:
        Runtime(strict=True)
    message = str(info.value)
    assert message.startswith("strict mode: plugin problem(s): ")
    assert f"broken_import (crosschip_broken_import.plugin) is failed: {BROKEN_IMPORT_ERROR}" in message
    assert "wrong_api (crosschip_wrong_api.plugin) is incompatible: backend 'wrong_api' declares plugin API version 999" in message
    assert "unknown_hook (crosschip_unknown_hook.plugin) is incompatible: implements unknown hook(s) crosschip_register_kernels" in message

    installed.setenv("CROSSCHIP_STRICT", "1")
    with pytest.raises(PluginError, match="broken_import"):
        Runtime()
    installed.setenv("CROSSCHIP_DISABLE_PLUGINS", ",".join(BROKEN))
    reset_registry()
    assert Runtime().strict  # disabled plugins are no problem


@cpu_only
def test_strict_fallback_names_the_component_and_every_decline(installed):
    installed.setenv("CROSSCHIP_DISABLE_PLUGINS", ",".join(BROKEN))
    # te is unavailable on CPU and its declared fallback torch would build rms_norm: a named
    # backend that is unavailable is never replaced silently, so strict mode refuses it; named
    # alone, the template declines float64 and the reference builds it.
    rt = Runtime("te,template", device="cpu", dtype=torch.float64, strict=True)
    assert rt.chain("rms_norm").backends == ("te", "torch", "template", "reference")
    with pytest.raises(StrictFallbackError, match="built by 'torch', a declared fallback.*te: unavailable"):
        rt.rms_norm(NORM)
    rt = Runtime("template", device="cpu", dtype=torch.float64, strict=True)
    with pytest.raises(StrictFallbackError) as info:
        rt.rms_norm(NORM)
    message = str(info.value)
    assert message.startswith("strict mode: rms_norm for NormSpec(hidden_size=32, eps=1e-06) fell back "
                              "to the reference backend (")
    assert "template: float64: torch.nn.functional.rms_norm normalises in float64" in message
    assert "torch:" not in message

    lenient = Runtime("template", device="cpu", dtype=torch.float64, strict=False)
    with pytest.warns(CrosschipWarning, match="rms_norm .* fell back to the reference backend"):
        lenient.rms_norm(NORM)
    decision = lenient.report.decisions[-1]
    assert decision.backend == "reference"
    assert [backend for backend, _ in decision.declines] == ["template"]


# -- precedence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, kwargs, expected", [
    ({}, {}, ("torch", "auto")),
    ({"CROSSCHIP_BACKEND": "reference"}, {}, ("reference", "CROSSCHIP_BACKEND")),
    ({"CROSSCHIP_BACKEND": "reference", "CROSSCHIP_BACKEND_RMS_NORM": "template"}, {},
     ("template", "CROSSCHIP_BACKEND_RMS_NORM")),
    ({"CROSSCHIP_BACKEND": "template", "CROSSCHIP_BACKEND_RMS_NORM": "template"}, {"backend": "reference"},
     ("reference", "argument")),
    ({"CROSSCHIP_BACKEND_RMS_NORM": "reference"}, {"backend": "reference", "components": {"rms_norm": "template"}},
     ("template", "argument components['rms_norm']")),
], ids=["auto", "global-env", "component-env-beats-global-env", "argument-beats-env",
        "component-argument-beats-argument"])
def test_precedence_and_the_reported_source(installed, env, kwargs, expected):
    for var, value in env.items():
        installed.setenv(var, value)
    rt = Runtime(device="cpu", **kwargs)
    rt.rms_norm(NORM)
    assert _built_by(rt, "rms_norm") == expected
    assert rt.report.summary()["rms_norm"][0]["source"] == expected[1]


@cpu_only
def test_auto_picks_by_priority_not_registration_order(installed, tmp_path):
    # A development plugin registered after every entry point, with a priority between te and
    # torch, implementing rms_norm: auto must put it first.
    (tmp_path / "crosschip_priority_dev.py").write_text(textwrap.dedent("""
        from crosschip import BackendDescriptor, ComponentImpl, Probe, hookimpl

        @hookimpl
        def crosschip_register_backends():
            return [BackendDescriptor("priority_dev", 150, ("cpu",), lambda: Probe(True, "test"))]

        @hookimpl
        def crosschip_register_components():
            def build(spec, ctx):
                from crosschip.reference.components import RMSNorm
                return RMSNorm(spec)
            return [ComponentImpl("priority_dev", "rms_norm", build)]
    """))
    installed.syspath_prepend(str(tmp_path))
    installed.setenv("CROSSCHIP_PLUGIN_MODULES", "crosschip_priority_dev")
    registry = get_registry()
    order = list(registry.plugins)
    # Registered: entry points by name (template before torch), then development modules.
    assert order.index("template") < order.index("torch") < order.index("priority_dev")
    rt = Runtime(device="cpu")
    assert rt.chain("rms_norm").backends == ("priority_dev", "torch", "template", "reference")
    rt.rms_norm(NORM)
    rt.qkv_projection(QKV)
    assert _built_by(rt, "rms_norm") == ("priority_dev", "auto")
    assert _built_by(rt, "qkv_projection") == ("torch", "auto")


def test_unknown_backend_or_component_lists_the_valid_names(installed):
    with pytest.raises(UnknownNameError) as info:
        Runtime("tpu9000")
    # Broken plugins are not offered as valid choices.
    assert str(info.value) == ("unknown backend 'tpu9000' (from argument); valid backends: auto, neuron, "
                               "reference, te, template, torch")
    valid_components = ("valid components: attention, embedding, gated_mlp, layer_norm, linear, lm_head, loss, "
                        "mlp, moe, out_projection, qkv_projection, rms_norm, rotary")
    with pytest.raises(UnknownNameError) as info:
        Runtime(components={"flash_attention": "template"})
    assert str(info.value) == f"unknown component 'flash_attention' (from argument components); {valid_components}"
    installed.setenv("CROSSCHIP_BACKEND_RMSNORM", "template")
    with pytest.raises(UnknownNameError) as info:
        Runtime()
    assert str(info.value) == ("unknown component 'rmsnorm' (from environment variable "
                               f"CROSSCHIP_BACKEND_RMSNORM); {valid_components}")


# -- environment controls ---------------------------------------------------------------------------
def _statuses(registry) -> dict[str, tuple[str, str]]:
    return {name: (p.status, p.reason) for name, p in registry.plugins.items() if name != "reference"}


def test_allow_list_loads_only_the_named_plugins(installed):
    installed.setenv("CROSSCHIP_PLUGINS", "template")
    registry = get_registry()
    skipped = ("disabled", "not in CROSSCHIP_PLUGINS=template")
    assert _statuses(registry) == {
        "template": ("loaded", ""), "torch": skipped, "te": skipped, "neuron": skipped,
        "broken_import": skipped, "wrong_api": skipped, "unknown_hook": skipped}
    assert registry.backend_names() == ["reference", "template"]
    rt = Runtime(device="cpu", strict=True)  # nothing failed: strict is fine
    assert rt.chain("qkv_projection").backends == ("template", "reference")
    with pytest.raises(ConfigurationError, match="backend 'torch' .* its plugin is disabled: not in CROSSCHIP_PLUGINS"):
        Runtime("torch")


@cpu_only
def test_disable_plugins(installed):
    installed.setenv("CROSSCHIP_DISABLE_PLUGINS", "broken_import, wrong_api,unknown_hook,torch")
    registry = get_registry()
    statuses = _statuses(registry)
    for name in (*BROKEN, "torch"):
        assert statuses[name] == ("disabled", "disabled by CROSSCHIP_DISABLE_PLUGINS")
    assert {name: statuses[name][0] for name in ("template", "te", "neuron")} == dict.fromkeys(
        ("template", "te", "neuron"), "loaded")
    rt = Runtime(device="cpu", strict=True)
    assert rt.chain("qkv_projection").backends == ("template", "reference")


def test_autoload_off_loads_only_allow_listed_plugins(installed):
    installed.setenv("CROSSCHIP_PLUGIN_AUTOLOAD", "0")
    registry = get_registry()
    assert registry.backend_names() == ["reference"]
    assert set(_statuses(registry).values()) == {
        ("disabled", "CROSSCHIP_PLUGIN_AUTOLOAD=0 and not named in CROSSCHIP_PLUGINS")}
    assert len(_statuses(registry)) == 7

    installed.setenv("CROSSCHIP_PLUGINS", "template")
    reset_registry()
    assert get_registry().backend_names() == ["reference", "template"]


def test_plugin_modules_load_by_import_path(installed):
    installed.setenv("CROSSCHIP_PLUGIN_AUTOLOAD", "0")
    installed.setenv("CROSSCHIP_PLUGIN_MODULES", "crosschip_template.plugin,crosschip_no_such_dev_module")
    registry = get_registry()
    record = registry.plugins["template"]
    assert (record.source, record.value, record.distribution, record.status) == (
        "module", "crosschip_template.plugin", "-", "loaded")
    missing = registry.plugins["crosschip_no_such_dev_module"]
    assert (missing.status, missing.reason) == (
        "failed", "import failed: ModuleNotFoundError: No module named 'crosschip_no_such_dev_module'")
    assert registry.backend_names() == ["reference", "template"]
    rt = Runtime(device="cpu")
    assert rt.rms_norm(NORM).crosschip_component.backend == "template"


@cpu_only
def test_te_and_neuron_are_registered_but_unavailable(installed):
    registry = get_registry()
    for name, priority, reason in (("te", 200, TE_REASON), ("neuron", 300, "not installed")):
        assert registry.plugins[name].status == "loaded"
        probe = registry.backend(name).probe()
        assert not probe.available and reason in probe.reason
        assert registry.backend(name).descriptor.priority == priority
    rt = Runtime(device="cpu")
    assert "te" not in rt.chain("qkv_projection").backends  # auto skips unavailable backends
    with pytest.warns(CrosschipWarning, match=f"te: unavailable: {TE_REASON}"):
        Runtime("te", device="cpu").rotary(ROPE)


def test_template_package_passes_its_own_tests(plugin_site):
    """The template tests itself with the conformance kit, installed like any plugin."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "plugins" / "crosschip-template")],
        capture_output=True, text=True, env=subprocess_environ(plugin_site), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and not any(w in summary for w in ("skipped", "failed", "error")), summary


# -- a real third-party kernel plugin: plugins/crosschip-liger --------------------------------------
LIGER_REASON = "liger-kernel is not installed (pip install 'crosschip-liger[kernels]')"
#: CI installs no liger-kernel (see docs/backends.md): the plugin must register and explain that.
liger_absent = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                                  reason="expects liger-kernel to be absent, as on CPU CI")


@pytest.fixture
def liger(liger_plugin_site, monkeypatch):
    for var in set(os.environ) - set(clean_environ()):
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(liger_plugin_site))
    reset_registry()
    yield liger_plugin_site
    reset_registry()


@liger_absent
def test_liger_registers_unavailable_with_its_reason_and_components_fall_through(liger):
    registry = get_registry()
    record = registry.plugins["liger"]
    assert (record.source, record.distribution, record.version, record.status) == (
        "entry point", "crosschip-liger", "0.1.0", "loaded")
    assert registry.components_of("liger") == ["gated_mlp", "rms_norm", "rotary", "loss"]
    assert registry.backend("liger").probe() == crosschip.Probe(False, LIGER_REASON)
    assert "liger" not in Runtime(device="cpu").chain("rms_norm").backends  # auto skips it
    with pytest.warns(CrosschipWarning, match=re.escape(f"liger: unavailable: {LIGER_REASON}")):
        norm = Runtime("liger", device="cpu").rms_norm(NORM)
    assert norm.crosschip_component.backend == "reference"
    with pytest.raises(StrictFallbackError, match=re.escape(f"liger: unavailable: {LIGER_REASON}")):
        Runtime(components={"loss": "liger"}, device="cpu", strict=True).loss(crosschip.LossSpec(64))


@liger_absent
def test_crosschip_backends_lists_liger_with_its_reason(liger):
    from plugin_site import run_cli

    result = run_cli(liger, "backends")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^liger\s+unavailable\s+150\s+crosschip-liger\s+0\.1\.0\s+gated_mlp,rms_norm,rotary,loss$",
                     result.stdout, re.M), result.stdout
    assert f"\n  liger: {LIGER_REASON}\n" in result.stdout


@liger_absent
def test_liger_package_passes_its_own_cpu_tests(liger):
    """Its suite without the ``cuda`` tests (those run on the GPU machine): nothing skipped."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda",
         str(ROOT / "plugins" / "crosschip-liger")],
        capture_output=True, text=True, env=subprocess_environ(liger), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and not any(w in summary for w in ("skipped", "failed", "error")), summary


def test_a_factory_that_raises_is_a_build_error_naming_backend_component_and_spec(installed, tmp_path):
    (tmp_path / "crosschip_raising_dev.py").write_text(textwrap.dedent("""
        from crosschip import BackendDescriptor, ComponentImpl, Probe, hookimpl

        @hookimpl
        def crosschip_register_backends():
            return [BackendDescriptor("raising_dev", 10, ("cpu",), lambda: Probe(True, "test"))]

        @hookimpl
        def crosschip_register_components():
            def build(spec, ctx):
                raise ValueError("kernel table is empty")
            return [ComponentImpl("raising_dev", "rms_norm", build)]
    """))
    installed.syspath_prepend(str(tmp_path))
    installed.setenv("CROSSCHIP_PLUGIN_MODULES", "crosschip_raising_dev")
    from crosschip.errors import ComponentBuildError

    with pytest.raises(ComponentBuildError) as info:
        Runtime("raising_dev", device="cpu").rms_norm(NORM)
    message = str(info.value)
    assert "backend 'raising_dev' failed to build rms_norm for" in message and "hidden_size" in message, message
    assert "ValueError: kernel table is empty" in message, message
