"""``crosschip train --backend neuron --tp 2`` on neuronx-distributed's CPU mode (gloo): the same
losses as the reference backend in one process, an interrupted and resumed run equal to the
uninterrupted one bit for bit, and a training state refused under another platform's KV-head
arrangement or at another tp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosschip.training.train import TrainArgs, train
from gloo_spawn import spawn
from helpers import save_hf_llama, train_interrupted

pytestmark = pytest.mark.neuron_cpu

ARGS = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, seed=5)
PLATFORM = "NEURON_PLATFORM_TARGET_OVERRIDE"


def _run(rank: int, world: int, root: Path) -> None:
    from crosschip.errors import ConfigurationError

    os.environ.update(NXD_CPU_MODE="1", **{PLATFORM: "trn1"})
    losses = train_interrupted(root, "neuron", 3, backend="neuron", tp=world, **ARGS)
    # One KV head at tp=2: replicated, so the state's layout depends on the platform.
    half = TrainArgs(model=str(root / "kv1"), backend="neuron", tp=world, out=str(root / "kv1-half"),
                     stop_after=2, **ARGS)
    train(half, progress=False)
    os.environ[PLATFORM] = "trn2"
    try:
        train(TrainArgs(model=str(root / "kv1"), backend="neuron", tp=world, resume=str(root / "kv1-half"),
                        out=str(root / "kv1-trn2"), **ARGS), progress=False)
        refused = None
    except ConfigurationError as exc:
        refused = str(exc)
    if rank == 0:
        (root / "losses.json").write_text(json.dumps({**losses, "refused": refused}))


def test_neuron_training_matches_reference_and_resumes_exactly(tmp_path):
    save_hf_llama(tmp_path / "kv1", num_key_value_heads=1, vocab_size=258)
    single = train(TrainArgs(out=str(tmp_path / "single"), backend="reference", **ARGS), progress=False)
    spawn(2, tmp_path, _run)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses["full"]) == len(single.losses) == ARGS["steps"]
    for got, expected in zip(losses["full"], single.losses):
        assert abs(got - expected) <= 1e-5 * abs(expected), (losses["full"], single.losses)
    assert losses["half"] == losses["full"][:3]
    assert losses["resumed"] == losses["full"], "interrupted + resumed run differs from the uninterrupted one"
    # The recorded layout names the platform whose KV groups the weights follow; the refusal says so.
    refused = losses["refused"] or ""
    assert "neuron:qkv_projection in another physical layout" in refused, refused
    assert "trn1: adjacent KV replicas" in refused and "trn2: adjacent KV replicas" in refused, refused
    saved = json.loads((tmp_path / "kv1-half" / "training_state" / "meta.json").read_text())["layouts"]
    assert "trn1: adjacent KV replicas" in saved["neuron:qkv_projection"], saved


def test_cli_under_torchrun_trains_on_neuron_and_exits_cleanly(tmp_path):
    import crosschip

    out = tmp_path / "cli"
    env = {**os.environ, "NXD_CPU_MODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "crosschip.cli", "train", "--backend", "neuron", "--tp", "2", "--steps", "2", "--batch-size", "4",
         "--seq-len", "32", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved a Hugging Face checkpoint to") == 1, result.stdout
    crosschip.from_pretrained(out, backend="reference")


def test_the_neuron_example_runs_in_cpu_mode(tmp_path):
    """examples/train_neuron.py as its docstring shows it, with sequence parallelism."""
    import crosschip

    save_hf_llama(tmp_path / "llama")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "examples" / "train_neuron.py"), "--model", str(tmp_path / "llama"), "--out",
         str(tmp_path / "out"), "--steps", "2", "--seq-len", "16", "--sequence-parallel"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NXD_CPU_MODE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1: loss" in result.stdout and "qkv_projection: neuron" in result.stdout, result.stdout
    crosschip.from_pretrained(tmp_path / "out", backend="torch")
