"""Plot train_step.py results: tokens/s per variant and sequence length, speed-up over
transformers on each bar.

    python benchmarks/plot_train_step.py benchmarks/results/train_step_1b_oib_h100_20261207b.json \\
        benchmarks/results/train_step_8b_oib_none_h100_20261207b.json --out docs/img/train_step_h100.png
"""

from __future__ import annotations

import argparse
import json
import sys


def label(run: dict) -> str:
    """The variant, with the settings it ran at when they are not the defaults (each side runs at
    its own best activation checkpointing; the optimizer may step in backward)."""
    parts = [run["variant"]]
    if run.get("activation_checkpointing", "none") != "none":
        parts.append(f"AC {run['activation_checkpointing']}")
    if run.get("optimizer_in_backward"):
        parts.append("opt. in bwd")
    return "\n".join(parts)


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    panels = []
    for path in args.results:
        report = json.load(open(path))
        for seq in sorted({r["seq"] for r in report["runs"]}):
            runs = [r for r in report["runs"] if r["seq"] == seq and r.get("status") == "ok"]
            title = f"{report['shape'].upper()}, seq {seq}"
            panels.append((title, runs, report["versions"].get("gpu", "GPU")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, runs, gpu) in zip(axes[0], panels):
        names = [label(r) for r in runs]
        values = [r["tokens_per_s"] / 1e3 for r in runs]
        colors = ["#888888" if r["variant"] == "transformers" else "#4060c0" if r["variant"].startswith("te")
                  else "#2e7d32" for r in runs]
        bars = ax.bar(range(len(runs)), values, color=colors)
        for bar, r in zip(bars, runs):
            speedup = r.get("speedup_vs_transformers")
            if speedup is not None:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{speedup:.2f}x",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(runs)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("k tokens / s")
    fig.suptitle(f"Training step (forward + backward + AdamW), {gpu}", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
