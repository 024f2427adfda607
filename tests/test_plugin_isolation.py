"""One broken or slow plugin never takes down another backend or the CLI.

Each case is a throwaway plugin module written into ``tmp_path`` and loaded through
``CROSSCHIP_PLUGIN_MODULES`` beside the real installed packages (plugin_site.py). Plugins that
exit or hang run in a subprocess with a timeout; the rest run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from crosschip import NormSpec, PluginError, Runtime
from crosschip.cli import main
from crosschip.plugins.registry import get_registry, reset_registry
from plugin_site import BROKEN, ROOT, clean_environ, subprocess_environ

NORM = NormSpec(32)
HEADER = "from crosschip import BackendDescriptor, ComponentImpl, Probe, hookimpl\n"


def _descriptor(name: str, **fields: str) -> str:
    """A ``crosschip_register_backends`` returning one descriptor; ``fields`` are Python source."""
    values = {"name": repr(name), "priority": "150", "device_types": "('cpu',)",
              "probe": "lambda: Probe(True, 'test')", **fields}
    return textwrap.dedent(f"""
        @hookimpl
        def crosschip_register_backends():
            return [BackendDescriptor({", ".join(f"{k}={v}" for k, v in values.items())})]
    """)


def _write(directory, name: str, *parts: str) -> str:
    """A plugin module ``name`` made of ``parts`` (each dedented on its own)."""
    (directory / f"{name}.py").write_text(HEADER + "\n".join(textwrap.dedent(p) for p in parts))
    return name


@pytest.fixture
def dev_plugins(plugin_site, tmp_path, monkeypatch):
    """Load throwaway plugin modules: ``dev_plugins(module, ...)`` returns the fresh registry."""
    for var in set(os.environ) - set(clean_environ()):
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(*modules: str):
        monkeypatch.setenv("CROSSCHIP_PLUGIN_MODULES", ",".join(modules))
        reset_registry()
        return get_registry()

    load.env = monkeypatch
    load.dir = tmp_path
    yield load
    for path in tmp_path.glob("*.py"):  # the next test's module of that name is another one
        sys.modules.pop(path.stem, None)


def _listing(capsys) -> dict:
    """``crosschip backends --json`` in-process, as ``{name: row}``."""
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # The other backends still resolve (which one depends on the hardware).
    assert data["resolved"]["rms_norm"]["backend"] in ("torch", "te", "neuron")
    return {row["name"]: row for row in data["backends"]}


# -- exiting and hanging plugins (subprocess) ----------------------------------------------------
def test_exiting_and_hanging_plugins_leave_the_listing_intact(plugin_site, tmp_path):
    _write(tmp_path, "crosschip_exits_dev", "import sys\nsys.exit(3)\n")
    _write(tmp_path, "crosschip_hangs_dev", "import threading\n", _descriptor(
        "hangs", probe="lambda: threading.Event().wait()"))
    env = subprocess_environ(plugin_site, CROSSCHIP_PLUGIN_MODULES="crosschip_exits_dev,crosschip_hangs_dev",
                             CROSSCHIP_PROBE_TIMEOUT="0.5")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "crosschip.cli", "backends", "--json"], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("crosschip backends hung on a plugin whose probe never returns", pytrace=False)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr!r}"
    rows = {row["name"]: row for row in json.loads(result.stdout)["backends"]}
    assert (rows["crosschip_exits_dev"]["status"], rows["crosschip_exits_dev"]["reason"]) == (
        "failed", "import failed: SystemExit: 3")
    assert (rows["hangs"]["status"], rows["hangs"]["available"]) == ("unavailable", False)
    assert rows["hangs"]["reason"] == ("availability probe did not return within 0.5 s "
                                       "(CROSSCHIP_PROBE_TIMEOUT); not retried in this process")
    assert rows["torch"]["status"] == rows["template"]["status"] == "available"
    assert time.monotonic() - started < 30


def test_a_hanging_probe_is_bounded_once_per_process(dev_plugins):
    _write(dev_plugins.dir, "crosschip_slow_dev", """
        import threading
        calls, release = [], threading.Event()

        def probe():
            calls.append(1)
            release.wait(5)  # bounded, so the old unbounded code fails instead of hanging CI
            return Probe(True, "late")
    """, _descriptor("slow", probe="probe"))
    dev_plugins.env.setenv("CROSSCHIP_PROBE_TIMEOUT", "0.2")
    registry = dev_plugins("crosschip_slow_dev")
    import crosschip_slow_dev

    try:
        started = time.monotonic()
        chains = [Runtime(device="cpu").chain("rms_norm").backends for _ in range(3)]
        elapsed = time.monotonic() - started
        assert chains == [("torch", "template", "reference")] * 3
        assert crosschip_slow_dev.calls == [1]
        assert elapsed < 2, f"three runtimes took {elapsed:.1f} s behind a 0.2 s probe timeout"
        assert registry.backend("slow").probe().reason.startswith(
            "availability probe did not return within 0.2 s")
    finally:
        crosschip_slow_dev.release.set()


def test_probe_timeout_must_be_a_positive_number(dev_plugins):
    dev_plugins.env.setenv("CROSSCHIP_PROBE_TIMEOUT", "soon")
    dev_plugins()
    with pytest.raises(ValueError, match="CROSSCHIP_PROBE_TIMEOUT='soon': expected a positive number "
                                         "of seconds"):
        Runtime(device="cpu")


# -- what hooks return --------------------------------------------------------------------------
@pytest.mark.parametrize("fields, reason", [
    ({"priority": "'high'"}, "backend 'typed': priority is str ('high'), expected int"),
    ({"device_types": "'cpu'"}, "backend 'typed': device_types is str ('cpu'), expected a tuple of str"),
    ({"fallbacks": "('torch', 3)"},
     "backend 'typed': fallbacks is tuple (('torch', 3)), expected a tuple of str"),
    ({"probe": "True"}, "backend 'typed': probe is bool (True), expected a callable"),
], ids=["priority", "device-types", "fallbacks", "probe"])
def test_descriptor_fields_of_the_wrong_type_are_incompatible(dev_plugins, capsys, fields, reason):
    registry = dev_plugins(_write(dev_plugins.dir, "crosschip_typed_dev", _descriptor("typed", **fields)))
    record = registry.plugins["crosschip_typed_dev"]
    assert (record.status, record.reason) == ("incompatible", reason)
    assert "typed" not in registry.backends
    assert _listing(capsys)["crosschip_typed_dev"]["status"] == "incompatible"


def test_registration_that_is_no_list_is_incompatible(dev_plugins, capsys):
    registry = dev_plugins(_write(dev_plugins.dir, "crosschip_single_dev", """
        @hookimpl
        def crosschip_register_backends():
            return BackendDescriptor("single", 150, ("cpu",), lambda: Probe(True, ""))
    """))
    record = registry.plugins["crosschip_single_dev"]
    assert (record.status, record.reason) == (
        "incompatible", "crosschip_register_backends returned BackendDescriptor, expected a list")
    _listing(capsys)


@pytest.mark.parametrize("result, reason", [
    ("'yes'", "availability probe returned str ('yes'), expected crosschip.Probe"),
    ("Probe('yes')", "availability probe returned Probe(available='yes', reason=''): available must "
                     "be a bool and reason a str"),
], ids=["string", "probe-of-string"])
def test_probe_must_return_a_probe(dev_plugins, capsys, result, reason):
    registry = dev_plugins(_write(dev_plugins.dir, "crosschip_truthy_dev",
                                  _descriptor("truthy", probe=f"lambda: {result}")))
    probe = registry.backend("truthy").probe()
    assert (probe.available, probe.reason) == (False, reason)
    assert "truthy" not in Runtime(device="cpu").chain("rms_norm").backends
    assert (_listing(capsys)["truthy"]["status"]) == "unavailable"


def test_validate_runtime_raising_another_error_fails_only_its_plugin(dev_plugins, capsys):
    module = _write(dev_plugins.dir, "crosschip_validates_dev", _descriptor("validates"), """
        @hookimpl
        def crosschip_register_components():
            from crosschip.reference.components import RMSNorm
            return [ComponentImpl("validates", "rms_norm", lambda spec, ctx: RMSNorm(spec))]

        @hookimpl
        def crosschip_validate_runtime(runtime):
            raise RuntimeError("boom")
    """)
    dev_plugins.env.setenv("CROSSCHIP_DISABLE_PLUGINS", ",".join(BROKEN))
    reason = "crosschip_validate_runtime raised RuntimeError: boom"
    strict_error = f"strict mode: plugin problem\\(s\\): validates \\({module}\\) is failed: {reason}$"
    dev_plugins(module)
    with pytest.raises(PluginError, match=strict_error):
        Runtime(device="cpu", strict=True)

    registry = dev_plugins(module)
    runtime = Runtime(device="cpu")  # auto would pick `validates` (150) for rms_norm
    record = registry.plugins["validates"]
    assert (record.status, record.reason) == ("failed", reason)
    assert runtime.rms_norm(NORM).crosschip_component.backend == "torch"
    assert "validates" not in Runtime(device="cpu").chain("rms_norm").backends
    row = _listing(capsys)["validates"]
    assert (row["status"], row["reason"], row["available"]) == ("failed", reason, False)
    with pytest.raises(PluginError, match=strict_error):
        Runtime(device="cpu", strict=True)


def test_exit_in_a_registration_hook_fails_only_its_plugin(dev_plugins, capsys):
    registry = dev_plugins(_write(dev_plugins.dir, "crosschip_hook_exits_dev", """
        import sys

        @hookimpl
        def crosschip_register_backends():
            sys.exit(4)
    """))
    record = registry.plugins["crosschip_hook_exits_dev"]
    assert (record.status, record.reason) == ("failed", "crosschip_register_backends raised SystemExit: 4")
    _listing(capsys)


def test_keyboard_interrupt_at_import_still_propagates(dev_plugins):
    _write(dev_plugins.dir, "crosschip_interrupted_dev", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        dev_plugins("crosschip_interrupted_dev")


def test_loading_a_registered_module_again_is_harmless(dev_plugins, capsys):
    registry = dev_plugins("crosschip_template.plugin")  # also loaded through its entry point
    again = registry.plugins["crosschip_template.plugin"]
    assert (again.status, again.reason) == ("disabled", "module crosschip_template.plugin is already "
                                            "registered as plugin 'template'")
    assert registry.plugins["template"].status == "loaded"
    assert registry.pm.get_plugin("template") is not None  # the original's hooks stay registered
    facts = registry.call_on(["template"], "crosschip_environment_info")
    assert facts == [{"crosschip-template": "0.1.0"}]
    assert _listing(capsys)["template"]["status"] == "available"


def test_exit_in_a_diagnostics_hook_is_an_error_naming_the_plugin(dev_plugins, capsys):
    dev_plugins(_write(dev_plugins.dir, "crosschip_info_exits_dev", _descriptor("info_exits"), """
        import sys

        @hookimpl
        def crosschip_environment_info():
            sys.exit(5)
    """))
    assert main(["backends", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["environment"]["info_exits"]
    assert facts == {"error": "PluginError: plugin 'info_exits': crosschip_environment_info raised "
                              "SystemExit: 5"}
