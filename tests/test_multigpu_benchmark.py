"""``benchmarks/train_step_multigpu.py`` on the CPU: its driver starts each layout in its own
torchrun (gloo), at world size 4 (dp=2 x tp=2 with sequence parallelism, dp=4) and 8 (dp=4 x
tp=2). Every layout trains the same weights on the same global batch, so the first step's loss
must equal one process's on the whole batch; the JSON must hold what the eight-GPU run reports
(issue 16), te variants recorded as skipped, and the scaling against a baseline file."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SEQ, GLOBAL_BATCH, STEPS = 64, 4, 2
#: First timed losses (after one warm-up step) of one process and of a (dp, tp) layout differ
#: only in float32 summation order (row-parallel partial sums, the vocabulary-sharded
#: cross-entropy, FSDP's gradient average, the mean over replicas): a few roundings of 6e-8
#: relative each; the warm-up AdamW step moves a weight by about lr = 1e-5 whatever its
#: gradient's rounding, so it adds no more. Measured: 1e-7. 1e-6 keeps a 10x margin and stays far
#: below what a wrong split gives: the replicas' own losses differ by ~5e-3.
LOSS_RTOL = 1e-6


def _drive(tmp_path: Path, name: str, *options: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "core"), str(ROOT / "backends"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("WORLD_SIZE", None)  # the test itself is not a launch: the script must drive
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step_multigpu.py"), "--device", "cpu",
           "--dtype", "float32", "--shape", "tiny", "--seq", str(SEQ), "--global-batch", str(GLOBAL_BATCH),
           "--steps", str(STEPS), "--warmup", "1", "--out", str(out), *options]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _benchmark(name: str):
    """A module of benchmarks/ (not a package: its scripts import each other by file name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def one_process_loss() -> float:
    """The first timed step's loss of one process on the whole global batch, after the one
    warm-up step (forward, backward, AdamW) the benchmark takes: the same canonical weights,
    optimizer and batch generator."""
    train_step = _benchmark("train_step")
    build, llama_config, timed_steps = train_step.build, train_step.llama_config, train_step.timed_steps
    config = llama_config("tiny", SEQ)
    model = build("torch", config, 0, "none", device="cpu", dtype="float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    _, losses = timed_steps(model, optimizer, ids, 1, 1, {}, device="cpu", return_logits=False)
    return losses[0]


def _check_run(run: dict, layout: str, dp: int, tp: int, activation_checkpointing: str, expected_loss: float):
    assert run["status"] == "ok", run
    assert (run["layout"], run["dp"], run["tp"], run["world_size"]) == (layout, dp, tp, dp * tp)
    assert run["sequence_parallel"] is (tp > 1)
    assert run["activation_checkpointing"] == activation_checkpointing
    assert len(run["step_s_all"]) == len(run["losses"]) == STEPS and min(run["step_s_all"]) > 0
    assert len(run["step_s_per_rank"]) == dp * tp
    assert run["tokens_per_step"] == GLOBAL_BATCH * SEQ
    assert run["tokens_per_s_per_gpu"] == pytest.approx(GLOBAL_BATCH * SEQ / run["step_s_median"] / (dp * tp))
    assert 0 < run["mfu_vs_peak"] < 1 and run["mfu_basis"] == "bf16 dense peak"
    assert run["peak_memory_gib"] == max(run["peak_memory_gib_per_rank"]) > 0
    assert len(run["peak_memory_gib_per_rank"]) == dp * tp
    assert run["backends"]["qkv_projection"] == run["backends"]["gated_mlp"] == ["torch"]
    assert run["losses"][0] == pytest.approx(expected_loss, rel=LOSS_RTOL)
    # Ranks are (dp, tp)-ordered: a replica's tp ranks hold one loss, and the replicas' losses
    # differ (each trained on its own rows of the global batch).
    first = [losses[0] for losses in run["losses_per_rank"]]
    replicas = [first[i * tp:(i + 1) * tp] for i in range(dp)]
    assert all(len(set(group)) == 1 for group in replicas), first
    assert len({group[0] for group in replicas}) == dp, first


@pytest.mark.slow  # two launches of four ranks on two cores: about 40 s
def test_world_size_four(tmp_path, one_process_loss):
    # A baseline in train_step.py's format: one GPU, no world_size key.
    baseline = tmp_path / "one_gpu.json"
    baseline.write_text(json.dumps({"runs": [
        {"variant": "torch", "seq": SEQ, "status": "ok", "tokens_per_s": 1000.0, "activation_checkpointing": "none"},
        {"variant": "torch", "seq": 2 * SEQ, "status": "ok", "tokens_per_s": 1.0},  # another seq: not used
        {"variant": "te-fp8", "seq": SEQ, "status": "ok", "tokens_per_s": 1.0}]}))  # another variant
    report = _drive(tmp_path, "world4", "--variants", "torch", "te-fp8", "--layouts", "dp2xtp2", "dp4",
                    "--activation-checkpointing", "torch@dp4=none", "selective", "torch=full",
                    "--baseline", str(baseline))
    assert "train_step_multigpu.py" in report["command"] and report["versions"]["torch"] == torch.__version__
    assert report["activation_checkpointing"] == {"torch@dp2xtp2": "full", "torch@dp4": "none",
                                                  "te-fp8@dp2xtp2": "selective", "te-fp8@dp4": "selective"}
    torch_runs = [r for r in report["runs"] if r["variant"] == "torch"]
    for run, (layout, dp, tp, checkpointing) in zip(torch_runs, [("dp2xtp2", 2, 2, "full"), ("dp4", 4, 1, "none")],
                                                    strict=True):
        _check_run(run, layout, dp, tp, checkpointing, one_process_loss)
        assert run["scaling"] == [dict(file=str(baseline), layout="1 GPU", world_size=1,
                                       activation_checkpointing="none", tokens_per_s_per_gpu=1000.0,
                                       efficiency=run["tokens_per_s_per_gpu"] / 1000.0)]
    # Same weights, same global batch: the layouts' first losses agree with each other too.
    assert torch_runs[0]["losses"][0] == pytest.approx(torch_runs[1]["losses"][0], rel=LOSS_RTOL)
    skipped = [r for r in report["runs"] if r["variant"] == "te-fp8"]
    assert [(r["layout"], r["status"]) for r in skipped] == [("dp2xtp2", "skipped"), ("dp4", "skipped")]
    assert all("CUDA" in r["reason"] for r in skipped)
    # The docs' table, from this JSON: one row per run, skips with their reason.
    text = _benchmark("report_multigpu").table([report])
    dp4 = torch_runs[1]
    assert (f"| torch | dp4 | {SEQ} | none | {dp4['tokens_per_s_per_gpu']:,.0f} | {dp4['mfu_vs_peak']:.1%} | "
            f"{dp4['peak_memory_gib']:.1f} | {dp4['scaling'][0]['efficiency']:.2f}x (1 GPU) | — |") in text
    assert text.count("skipped: Transformer Engine runs on CUDA only") == 2 and len(text.splitlines()) == 2 + 4


@pytest.mark.slow  # eight ranks on two cores: about 40 s
def test_world_size_eight(tmp_path, one_process_loss):
    report = _drive(tmp_path, "world8", "--variants", "torch", "--layouts", "dp4xtp2")
    (run,) = report["runs"]
    _check_run(run, "dp4xtp2", 4, 2, "none", one_process_loss)
    assert run["scaling"] == []  # no baseline given, none on fewer GPUs in this driver run


def test_layouts_and_checkpointing_entries():
    bench = _benchmark("train_step_multigpu")
    checkpointing_for, checkpointing_table = bench.checkpointing_for, bench.checkpointing_table
    layout_name, parse_layout = bench.layout_name, bench.parse_layout
    assert [parse_layout(t) for t in ("dp8", "tp2", "dp4xtp2", "dp1")] == [(8, 1), (1, 2), (4, 2), (1, 1)]
    assert [layout_name(*parse_layout(t)) for t in ("dp8", "tp2", "dp4xtp2", "dp1")] == ["dp8", "tp2", "dp4xtp2", "dp1"]
    for bad in ("", "x", "8", "dp0", "tp2xdp4", "dp4xtp"):
        with pytest.raises(Exception):
            parse_layout(bad)

    class Parser:
        def error(self, message):
            raise ValueError(message)

    settings = ("none", "full", "selective")
    # The most specific entry wins, whatever the order; "none" where nothing is given.
    table = checkpointing_table(Parser(), ["te-fp8@dp8=none", "full", "te-fp8=selective"], settings)
    assert checkpointing_for(table, "te-fp8", (8, 1)) == "none"
    assert checkpointing_for(table, "te-fp8", (4, 2)) == "selective"
    assert checkpointing_for(table, "torch", (8, 1)) == "full"
    assert checkpointing_for(checkpointing_table(Parser(), [], settings), "torch", (8, 1)) == "none"
    for bad in ("some", "liger=full", "@dp8=full", "torch@dp=full", "torch@x=none"):
        with pytest.raises(ValueError, match="--activation-checkpointing"):
            checkpointing_table(Parser(), [bad], settings)


def test_optimizer_in_backward_takes_the_same_step(tmp_path, one_process_loss):
    """--optimizer-in-backward (FSDP2 stepping each shard after its reduce-scatter) gives the loss
    one process gets after the same warm-up step taken after the backward, and is recorded."""
    report = _drive(tmp_path, "in-backward", "--variants", "torch", "--layouts", "dp2", "--optimizer-in-backward")
    (run,) = report["runs"]
    _check_run(run, "dp2", 2, 1, "none", one_process_loss)
    assert run["optimizer_in_backward"] is True
