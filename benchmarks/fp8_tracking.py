"""Does FP8 training track bf16 at scale? Runs ``crosschip train`` twice on the same random
checkpoint and data (the built-in corpus, or ``--corpus stdlib``), in bf16 and in FP8 on the te backend, and compares the
mean loss of the last fifth of the steps against the tolerance of the FP8 unit test
(``tests/test_cuda.py::test_fp8_training_tracks_bf16``: within 5% of bf16's).

    python benchmarks/fp8_tracking.py --shape 8b --dir /tmp/crosschip-load-8b --steps 200 \\
        --out benchmarks/results/fp8_tracking_8b.json
    # the same on text the runs do not repeat (the Python standard library's sources)
    python benchmarks/fp8_tracking.py --shape 8b --dir /tmp/crosschip-load-8b --steps 200 --corpus stdlib

The checkpoint is written once if absent (``random_checkpoint.py``, as ``load.py`` does); the runs
save nothing (``--no-save``: an 8B training state is 48 GB), only their metrics are read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: The FP8 unit test's tolerance on the tail loss, relative to bf16's.
TOLERANCE = 0.05


def tail_mean(losses: list[float]) -> float:
    """Mean of the last fifth of ``losses`` (at least one)."""
    tail = losses[-max(1, len(losses) // 5):]
    return sum(tail) / len(tail)


def report(runs: dict[str, list[float]]) -> dict:
    """Each run's tail mean, and FP8's relative difference from bf16 against :data:`TOLERANCE`."""
    tails = {name: tail_mean(losses) for name, losses in runs.items()}
    relative = abs(tails["fp8"] - tails["bf16"]) / tails["bf16"]
    learned = runs["bf16"][0] - tails["bf16"]
    return dict(tail_loss=tails, relative_difference=relative, tolerance=TOLERANCE, bf16_learned=learned,
                tracks=relative <= TOLERANCE)


def stdlib_text(path: Path, megabytes: float) -> Path:
    """A text corpus of about ``megabytes`` MB: the Python standard library's own sources, in
    sorted order (the same on every machine with the same Python). Unlike the built-in corpus (a
    small grammar an 8B model learns in a hundred steps), 200 steps of 2048 bytes read each byte
    once, so the loss stays where fitting, not memorising, sets it."""
    import sysconfig

    budget, parts = int(megabytes * 1e6), []
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in source.parts or budget <= 0:
            continue
        try:
            text = source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        budget -= len(text.encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def losses_of(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--dir", required=True, help="the random checkpoint (written if absent)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--corpus", choices=("builtin", "stdlib"), default="builtin",
                        help="builtin: crosschip train's own corpus; stdlib: the Python standard library's "
                             "sources (--corpus-mb of them), which 200 steps do not repeat")
    parser.add_argument("--corpus-mb", type=float, default=8.0)
    parser.add_argument("--work", default="/tmp/crosschip-fp8-tracking", help="where the runs write")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_checkpoint import write_checkpoint
    from train_step import llama_config

    directory = Path(args.dir)
    if not (directory / "config.json").exists():
        write_checkpoint(directory, llama_config(args.shape, args.seq))
    text = stdlib_text(Path(args.work) / "stdlib.txt", args.corpus_mb) if args.corpus == "stdlib" else None
    runs, seconds = {}, {}
    for precision in ("bf16", "fp8"):
        out = Path(args.work) / precision
        shutil.rmtree(out, ignore_errors=True)
        # The optimizer steps in the backward (no gradient memory), so the 8B shape fits without
        # recomputation; FP8 and bf16 run identically but for --precision.
        cmd = [sys.executable, "-m", "crosschip.cli", "train", "--model", str(directory), "--backend", "te",
               "--device", "cuda", "--dtype", "bf16", "--precision", "fp8" if precision == "fp8" else "auto",
               "--steps", str(args.steps), "--batch-size", str(args.batch), "--seq-len", str(args.seq),
               "--lr", str(args.lr), "--warmup", str(max(1, args.steps // 10)), "--max-grad-norm", "0",
               "--optimizer-in-backward", "--log-every", "1", "--no-save", "--out", str(out)]
        if text is not None:
            cmd += ["--text", str(text)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds[precision] = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        runs[precision] = losses_of(out)
        print(f"{precision}: first loss {runs[precision][0]:.3f}, tail {tail_mean(runs[precision]):.4f}, "
              f"{seconds[precision]:.0f} s")
    import torch

    result = dict(command="python benchmarks/fp8_tracking.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, shape=args.shape,
                  corpus=args.corpus, steps=args.steps, seq=args.seq, batch=args.batch, lr=args.lr, seconds=seconds, losses=runs, **report(runs))
    print(f"FP8 tail {result['tail_loss']['fp8']:.4f} vs bf16 {result['tail_loss']['bf16']:.4f}: "
          f"{result['relative_difference']:.2%} (tolerance {TOLERANCE:.0%}) -> "
          f"{'tracks' if result['tracks'] else 'does not track'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
