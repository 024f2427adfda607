"""Shared fixtures: tiny Hugging Face models saved locally (nothing downloads from a hub), and
hardware markers that skip where the hardware is absent but fail when
CROSSCHIP_REQUIRE_HARDWARE says it must be there."""

from __future__ import annotations

import os
import tempfile

# Tokenized datasets are cached by the datasets library; keep the tests' cache out of the user's.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="crosschip-test-datasets-"))

import pytest  # noqa: E402
import torch

from crosschip.plugins.registry import reset_registry


def _hardware_present(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "multigpu":
        return torch.cuda.is_available() and torch.cuda.device_count() >= 2
    if kind == "neuron":
        import glob
        import importlib.util

        return importlib.util.find_spec("torch_neuronx") is not None and bool(glob.glob("/dev/neuron*"))
    if kind == "neuron_cpu":  # NxD's CPU mode needs only the library itself
        import importlib.util

        return importlib.util.find_spec("neuronx_distributed") is not None
    return True


def _required() -> set[str]:
    raw = os.environ.get("CROSSCHIP_REQUIRE_HARDWARE", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def pytest_runtest_setup(item):
    for kind in ("cuda", "multigpu", "neuron", "neuron_cpu"):
        if item.get_closest_marker(kind) is None or _hardware_present(kind):
            continue
        required = _required()
        if kind.replace("_", "-") in required or (kind == "multigpu" and "cuda" in required):
            pytest.fail(f"{kind.replace('_', '-')} {'library' if kind == 'neuron_cpu' else 'hardware'} is required (CROSSCHIP_REQUIRE_HARDWARE="
                        f"{os.environ['CROSSCHIP_REQUIRE_HARDWARE']}) but is not present", pytrace=False)
        pytest.skip(f"no {kind.replace('_', '-')} {'library' if kind == 'neuron_cpu' else 'hardware'} here")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """The test plugin packages installed (offline, ``pip --target``) into one directory."""
    from plugin_site import install

    return install(tmp_path_factory)


@pytest.fixture(scope="session")
def kind_plugin_site(tmp_path_factory):
    """The plugin adding a component kind (plugins/crosschip-layerscale), in a directory of its own."""
    from plugin_site import KIND_PACKAGES, install

    return install(tmp_path_factory, KIND_PACKAGES, "kind-plugin")


@pytest.fixture(scope="session")
def liger_plugin_site(tmp_path_factory):
    """The Liger kernel plugin (plugins/crosschip-liger), in a directory of its own."""
    from plugin_site import LIGER_PACKAGES, install

    return install(tmp_path_factory, LIGER_PACKAGES, "liger-plugin")


@pytest.fixture
def te_installed():
    """Transformer Engine importable: else a skip, or a failure where CROSSCHIP_REQUIRE_HARDWARE
    asks for CUDA (the GPU machine must run the te tests, not skip them)."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return
    if {"cuda", "multigpu"} & _required():
        pytest.fail("CROSSCHIP_REQUIRE_HARDWARE asks for CUDA but transformer_engine is not installed",
                    pytrace=False)
    pytest.skip("transformer_engine is not installed")


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after: a test counting graphs sees only its own,
    and no compiled code or guard keeps this test's model alive."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees plugins as its own environment variables say."""
    reset_registry()
    yield
    reset_registry()
