"""``crosschip backends`` with the real plugin packages installed (see plugin_site.py), run as a
user runs it: a separate process that discovers the plugins through their entry points."""

from __future__ import annotations

import json
import re

from crosschip import PLUGIN_API_VERSION
from plugin_site import BROKEN_IMPORT_ERROR, cpu_only, run_cli

pytestmark = cpu_only



def test_json_lists_every_backend_and_the_resolved_choice(plugin_site):
    result = run_cli(plugin_site, "backends", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    rows = {b["name"]: b for b in data["backends"]}
    assert list(rows)[0] == "reference"
    assert set(rows) == {"reference", "torch", "te", "neuron", "template", "broken_import", "wrong_api",
                         "unknown_hook"}

    template = rows["template"]
    assert {k: template[k] for k in ("distribution", "version", "status", "priority", "device_types",
                                     "components", "source", "plugin")} == {
        "distribution": "crosschip-template", "version": "0.1.0", "status": "available", "priority": 50,
        "device_types": ["cpu"], "components": ["rms_norm"], "source": "entry point",
        "plugin": "crosschip_template.plugin"}

    broken = rows["broken_import"]
    assert (broken["status"], broken["reason"], broken["distribution"], broken["version"], broken["priority"]) == (
        "failed", BROKEN_IMPORT_ERROR, "crosschip-broken-import", "0.0.1", None)
    wrong = rows["wrong_api"]
    assert (wrong["status"], wrong["version"]) == ("incompatible", "2.0.0")
    assert wrong["reason"] == (f"backend 'wrong_api' declares plugin API version 999, this crosschip supports "
                               f"version {PLUGIN_API_VERSION}")
    hook = rows["unknown_hook"]
    assert hook["status"] == "incompatible"
    assert hook["reason"].startswith("implements unknown hook(s) crosschip_register_kernels;")

    for name, priority, reason in (("te", 200, "transformer_engine is not installed"),
                                   # neuronx_distributed, or (it present) the Neuron SDK
                                   ("neuron", 300, "not installed")):
        assert (rows[name]["status"], rows[name]["priority"], rows[name]["available"]) == ("unavailable", priority, False)
        assert reason in rows[name]["reason"]
    assert (rows["torch"]["status"], rows["torch"]["priority"]) == ("available", 100)

    resolved = data["resolved"]
    assert resolved["rms_norm"] == {"backend": "torch", "source": "auto",
                                    "chain": ["torch", "template", "reference"], "passed_over": []}
    assert resolved["qkv_projection"]["backend"] == "torch"
    assert resolved["embedding"]["backend"] == "torch"
    assert resolved["rotary"]["backend"] == "reference"
    # The failures are logged once each, and the command still succeeds.
    for name in ("broken_import", "wrong_api", "unknown_hook"):
        assert f"crosschip plugin {name!r}" in result.stderr


def test_table_shows_status_reason_and_resolution(plugin_site):
    result = run_cli(plugin_site, "backends", CROSSCHIP_BACKEND_RMS_NORM="reference")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^backend\s+status\s+priority\s+distribution\s+version\s+components$", out, re.M)
    assert re.search(r"^template\s+available\s+50\s+crosschip-template\s+0\.1\.0\s+rms_norm$", out, re.M)
    assert re.search(r"^broken_import\s+failed\s+-\s+crosschip-broken-import\s+0\.0\.1\s+-$", out, re.M)
    assert re.search(r"^wrong_api\s+incompatible\s+-\s+crosschip-wrong-api\s+2\.0\.0\s+-$", out, re.M)
    assert re.search(r"^te\s+unavailable\s+200\s+crosschip\s", out, re.M)
    assert f"\n  broken_import: {BROKEN_IMPORT_ERROR}\n" in out
    assert "\n  unknown_hook: implements unknown hook(s) crosschip_register_kernels;" in out
    assert re.search(r"^  rms_norm\s+reference  \(from CROSSCHIP_BACKEND_RMS_NORM; chain reference\)$", out, re.M)
    assert re.search(r"^  qkv_projection\s+torch  \(from auto; chain torch > template > reference\)$", out, re.M)


def test_strict_makes_plugin_failures_an_error(plugin_site):
    result = run_cli(plugin_site, "backends", CROSSCHIP_STRICT="1")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("crosschip: error: strict mode: plugin problem(s): ")
    assert f"broken_import (crosschip_broken_import.plugin) is failed: {BROKEN_IMPORT_ERROR}" in error
    assert "wrong_api (crosschip_wrong_api.plugin) is incompatible: backend 'wrong_api' declares plugin API version 999" in error
    assert "unknown_hook (crosschip_unknown_hook.plugin) is incompatible: implements unknown hook(s) crosschip_register_kernels" in error
    # The listing is still printed first, so the user sees what is wrong alongside what works.
    assert re.search(r"^template\s+available\s+50", result.stdout, re.M)


def test_unknown_backend_is_an_error_listing_the_valid_names(plugin_site):
    result = run_cli(plugin_site, "backends", "--backend", "tpu9000", CROSSCHIP_DISABLE_PLUGINS="wrong_api")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        "crosschip: error: unknown backend 'tpu9000' (from argument); valid backends: auto, neuron, reference, "
        "te, template, torch")
