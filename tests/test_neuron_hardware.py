"""The neuron backend on a Trainium host (marker ``neuron``: skipped elsewhere, failing where
``CROSSCHIP_REQUIRE_HARDWARE=neuron``, as ``tox -e neuron`` sets it). Written from the Neuron
SDK's documented API (torch-neuronx, torch-xla, neuronx-distributed); no Trainium machine was
available to run it, so these tests have not yet run on hardware.

On the device the backend runs in bf16 on XLA, under torchrun (one process per NeuronCore),
with ``xm.mark_step()`` after every optimizer step; the CPU-mode suite (``neuron_cpu``) checks
the same code for exact parity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.neuron

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, nproc: int = 2, timeout: int = 3600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NXD_CPU_MODE"}  # the device, not CPU mode
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_training_on_neuroncores_saves_a_checkpoint_any_backend_loads(tmp_path):
    """tp=2 on two NeuronCores, bf16: the first run compiles the step graph (minutes), later
    steps reuse it; the loss falls and the checkpoint loads on the reference backend (CPU)."""
    import crosschip

    out = tmp_path / "trn"
    result = _torchrun("-m", "crosschip.cli", "train", "--backend", "neuron", "--device", "xla", "--tp", "2",
                       "--dtype", "bfloat16", "--steps", "20", "--batch-size", "8", "--seq-len", "128",
                       "--log-every", "5", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    losses = json.loads((out / "training_state" / "meta.json").read_text())["losses"]
    assert len(losses) == 20 and losses[-1] < losses[0], losses
    crosschip.from_pretrained(out, backend="reference")


_LOGITS = r"""
import sys, torch, crosschip
path = sys.argv[1]
model = crosschip.from_pretrained(path, backend="neuron", device="xla", dtype="bfloat16", tp=2, strict=True)
ids = torch.randint(0, 258, (2, 64), generator=torch.Generator().manual_seed(0))
logits = model(ids.to("xla")).logits.float().cpu()
if torch.distributed.get_rank() == 0:
    torch.save(logits, sys.argv[2])
"""


def test_bf16_logits_on_neuroncores_match_the_cpu_reference(tmp_path):
    import torch

    import crosschip
    from crosschip.weights.init import init_weights
    from crosschip.checkpoint.loading import build_model
    from crosschip.models import model_class
    from crosschip.training.presets import preset_config
    from crosschip.runtime import Runtime

    config = preset_config("tiny-llama")
    reference = build_model(model_class(config.architectures[0]), config, Runtime("reference"))
    init_weights(reference, seed=0)
    reference.save_pretrained(tmp_path / "tiny")
    result = _torchrun("-c", _LOGITS, str(tmp_path / "tiny"), str(tmp_path / "logits.pt"))
    assert result.returncode == 0, result.stderr[-4000:]
    ids = torch.randint(0, 258, (2, 64), generator=torch.Generator().manual_seed(0))
    expected = crosschip.from_pretrained(tmp_path / "tiny", backend="reference")(ids).logits
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < 2e-2, error  # bf16 weights and activations against float32 on CPU
