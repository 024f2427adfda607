"""``benchmarks/load.py --shape tiny`` runs on CPU: it writes the checkpoint once (bytes as
planned, loadable by transformers), times each variant in its own process, checks the loaded
layer against the file and writes the JSON the GPU runs are read from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_load_benchmark_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "core"), str(ROOT / "backends"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out, directory = tmp_path / "load.json", tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--shape", "tiny", "--dir", str(directory),
           "--device", "cpu", "--repeats", "1", "--variants", "transformers", "torch", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["repeats"] == 1 and "load.py" in report["command"]
    stored = load_file(directory / "model.safetensors")
    assert report["checkpoint_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    for run in report["runs"]:
        assert run["status"] == "ok", run
        # layer 0's nine weights and the embedding, compared bitwise with the file in the worker
        assert run["verified_tensors"] == 10
        assert run["seconds"] > 0 and run["gb_per_s"] > 0 and run["peak_rss_gib"] > 0
    assert set(report["summary"]) == {"transformers", "torch"}
    # the checkpoint is reused, not rewritten, by a second run
    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    second = cmd[:cmd.index("--variants")] + ["--variants", "torch"]
    again = subprocess.run(second, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "writing a random" not in again.stdout
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime
