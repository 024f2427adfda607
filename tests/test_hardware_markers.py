"""Hardware tests never pass vacuously: on a machine without the hardware they skip, and with
CROSSCHIP_REQUIRE_HARDWARE naming it they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_marked(test_file: str, keyword: str, require: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CROSSCHIP_REQUIRE_HARDWARE"}
    if require:
        env["CROSSCHIP_REQUIRE_HARDWARE"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _run_cuda_test(require: str | None) -> subprocess.CompletedProcess:
    return _run_marked("tests/test_cuda.py", "compiles_on_cuda", require)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour where CUDA is absent")
def test_cuda_tests_skip_without_cuda_and_fail_when_required():
    plain = _run_cuda_test(None)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout
    required = _run_cuda_test("cuda")
    # pytest.fail during setup: reported as an error, the run fails.
    assert required.returncode == 1 and "1 error" in required.stdout, required.stdout
    assert "cuda hardware is required (CROSSCHIP_REQUIRE_HARDWARE=cuda)" in required.stdout


def _run_neuron_test(require: str | None) -> subprocess.CompletedProcess:
    return _run_marked("tests/test_neuron_hardware.py", "logits", require)


def test_neuron_tests_skip_without_trainium_and_fail_when_required():
    import glob

    if glob.glob("/dev/neuron*"):
        pytest.skip("checks the behaviour where no Neuron device is present")
    plain = _run_neuron_test(None)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout
    required = _run_neuron_test("neuron")
    assert required.returncode == 1 and "1 error" in required.stdout, required.stdout
    assert "neuron hardware is required (CROSSCHIP_REQUIRE_HARDWARE=neuron)" in required.stdout
