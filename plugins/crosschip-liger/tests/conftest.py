"""The ``cuda`` marker of this plugin's tests: a test marked ``cuda`` needs the liger backend
available (liger-kernel, triton and a CUDA device). Without it the test is skipped, with the
probe's reason, unless ``CROSSCHIP_REQUIRE_HARDWARE`` names ``cuda``: then it fails, so a GPU run
never passes by skipping everything."""

from __future__ import annotations

import os

import pytest


def _required() -> set[str]:
    return {part.strip() for part in os.environ.get("CROSSCHIP_REQUIRE_HARDWARE", "").split(",") if part.strip()}


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is None:
        return
    from crosschip_liger.plugin import probe

    result = probe()
    if result.available:
        return
    if "cuda" in _required():
        pytest.fail(f"CROSSCHIP_REQUIRE_HARDWARE={os.environ['CROSSCHIP_REQUIRE_HARDWARE']} but the liger "
                    f"backend is unavailable: {result.reason}", pytrace=False)
    pytest.skip(f"liger backend unavailable: {result.reason}")


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees the plugins its own environment says (crosschip caches the registry)."""
    from crosschip.plugins.registry import reset_registry

    reset_registry()
    yield
    reset_registry()
