"""Plot train_step.py results: tokens/s per variant and sequence length, speed-up over
transformers on each bar.

    python benchmarks/plot_train_step.py benchmarks/results/train_step_1b_h100.json \\
        benchmarks/results/train_step_8b_h100.json --out docs/img/train_step_h100.png
"""

from __future__ import annotations

import argparse
import json
import sys


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
            ac = runs[0].get("activation_checkpointing", "none") if runs else "none"
            title = f"{report['shape'].upper()}, seq {seq}" + ("" if ac == "none" else f", AC {ac}")
            panels.append((title, runs, report["versions"].get("gpu", "GPU")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, runs, gpu) in zip(axes[0], panels):
        names = [r["variant"] for r in runs]
        values = [r["tokens_per_s"] / 1e3 for r in runs]
        colors = ["#888888" if n == "transformers" else "#4060c0" if n.startswith("te") else "#2e7d32"
                  for n in names]
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
