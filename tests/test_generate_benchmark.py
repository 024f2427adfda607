"""benchmarks/generate_step.py runs end to end on CPU at its tiny shape (each variant in its own
process) and writes the JSON the docs read: what the lead runs on the GPU at the 1B shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow  # two worker processes, each importing torch and transformers: ~30 s
def test_generate_benchmark_smoke_run_writes_every_variant(tmp_path):
    out = tmp_path / "generate.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "core"), str(ROOT / "backends")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_step.py"), "--shape", "tiny",
                           "--prompt", "8", "--new-tokens", "3", "--batch", "2", "--runs", "1", "--warmup", "0",
                           "--device", "cpu", "--variants", "transformers-static", "torch-static",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["new_tokens"] == 3 and report["versions"]["torch"]
    runs = {run["variant"]: run for run in report["runs"]}
    assert set(runs) == {"transformers-static", "torch-static"}
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["new_tokens_per_s"] == pytest.approx(2 * 3 / run["seconds_median"])
    assert runs["transformers-static"]["vs_transformers_best"] == 1.0
    assert runs["torch-static"]["backends"]["attention"] == ["torch"]
