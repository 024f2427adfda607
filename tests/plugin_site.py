"""The real plugin packages under ``plugins/``, installed once per test session into a temporary
directory (offline, one pip call), so crosschip discovers them exactly as a user's installed
plugins: through ``importlib.metadata`` entry points of the ``crosschip.backends`` group.

Tests use the directory in-process (``monkeypatch.syspath_prepend``: importlib.metadata scans
``sys.path`` on every call) or in subprocesses (``PYTHONPATH``), never the shared environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    ROOT / "plugins" / "crosschip-template",
    ROOT / "plugins" / "testing" / "crosschip-broken-import",
    ROOT / "plugins" / "testing" / "crosschip-wrong-api",
    ROOT / "plugins" / "testing" / "crosschip-unknown-hook",
]
#: What the broken-import test package's status reason says.
BROKEN_IMPORT_ERROR = "import failed: ModuleNotFoundError: No module named 'crosschip_xpu_driver_bindings'"
#: Entry-point names of the test packages that are broken on purpose.
BROKEN = ("broken_import", "unknown_hook", "wrong_api")


def _accelerator_backend_available() -> bool:
    """Whether te or neuron could report anything but "not installed" here: the tests marked
    ``cpu_only`` expect exactly that reason (a GPU machine with TE but a busy or hidden GPU
    reports another)."""
    import importlib.util

    from crosschip_neuron.plugin import probe as neuron_probe

    return importlib.util.find_spec("transformer_engine") is not None or neuron_probe().available


#: For tests whose expected chains and messages assume te and neuron are unavailable (CPU CI).
cpu_only = pytest.mark.skipif(_accelerator_backend_available(),
                              reason="expects te and neuron to be unavailable, as on a CPU-only machine")

#: A plugin adding a component kind, installed into a site of its own: its backend would join
#: every auto chain the other tests expect.
KIND_PACKAGES = [ROOT / "plugins" / "crosschip-layerscale"]

#: The third-party kernel plugin (Liger), in a site of its own: where it is available (a CUDA
#: machine with liger-kernel) it would join the auto chains the other tests expect.
LIGER_PACKAGES = [ROOT / "plugins" / "crosschip-liger"]

_sites: dict[str, Path] = {}


def install(tmp_path_factory, packages=None, name: str = "plugin-packages") -> Path:
    """Install every package of :data:`PACKAGES` (or ``packages``; once per process and name)
    and return the directory."""
    if name not in _sites:
        packages = PACKAGES if packages is None else packages
        root = tmp_path_factory.mktemp(name)
        # Build from copies: pip builds local directories in place, leaving build/ and egg-info
        # behind, and the work tree must stay clean.
        sources = []
        for package in packages:
            copy = root / "src" / package.name
            shutil.copytree(package, copy, ignore=shutil.ignore_patterns(
                "build", "*.egg-info", "__pycache__", ".pytest_cache"))
            sources.append(str(copy))
        site = root / "site"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), *sources],
            capture_output=True, text=True, env={**clean_environ(), "PIP_NO_INPUT": "1"},
        )
        if result.returncode != 0:
            pytest.fail(f"installing the plugin packages failed:\n{result.stdout}\n{result.stderr}",
                        pytrace=False)
        _sites[name] = site
    return _sites[name]


def clean_environ(**overrides: str) -> dict[str, str]:
    """``os.environ`` without any crosschip setting (bar the hardware requirement), plus
    ``overrides``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CROSSCHIP_") or k == "CROSSCHIP_REQUIRE_HARDWARE"}
    env.update(overrides)
    return env


def subprocess_environ(site: Path, **overrides: str) -> dict[str, str]:
    """Environment for a subprocess that sees the installed plugin packages."""
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return clean_environ(PYTHONPATH=os.pathsep.join(paths), **overrides)


def run_cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosschip.cli", *args], capture_output=True, text=True,
                          env=subprocess_environ(site, **env), cwd=ROOT, timeout=120)
