"""The table (markdown) and plot of train_step_multigpu.py results for docs/benchmarks.md: per
variant and seq, tokens/s per GPU by layout, MFU, peak memory and the scaling efficiency against
the one- and two-GPU runs, with torchtitan's published figure drawn as a line.

    python benchmarks/report_multigpu.py benchmarks/results/multigpu_8b_*_h200x8.json \\
        --plot docs/img/multigpu_8b_h200x8.png
"""

from __future__ import annotations

import argparse
import json
import sys

#: torchtitan's Llama 3.1 8B TPS/GPU on 8 H100s, FSDP + torch.compile, bf16 and Float8
#: (benchmarks/llama3_h100_202412_torchtitan.md, Table 1; seq 8192, local batch 2, selective AC).
TORCHTITAN_8B_BF16, TORCHTITAN_8B_FP8 = 6667, 8532


def rows(reports: list[dict]) -> list[dict]:
    """Every run of every report, finished or not, ordered by seq, variant and world size."""
    runs = [run for report in reports for run in report["runs"]]
    return sorted(runs, key=lambda r: (r["seq"], r["variant"], r.get("world_size", 1), r.get("layout", "")))


def _scaling(run: dict, world: int) -> str:
    found = [s for s in run.get("scaling", []) if s["world_size"] == world]
    return ", ".join(f"{s['efficiency']:.2f}x ({s['layout']})" for s in found) or "—"


def table(reports: list[dict]) -> str:
    lines = ["| variant | layout | seq | AC | tokens/s per GPU | MFU (of 989) | peak memory per GPU (GiB) "
             "| vs 1 GPU | vs 2 GPUs |", "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rows(reports):
        head = f"| {r['variant']} | {r.get('layout', '1 GPU')} | {r['seq']} | {r.get('activation_checkpointing')} |"
        if r.get("status") != "ok":
            why = (r.get("reason") or r.get("error") or "").strip().splitlines()
            why = why[0][:120].replace("|", "/") if why else ""  # one line, no table breaks
            lines.append(f"{head} {r.get('status')}: {why} | | | | |")
            continue
        lines.append(f"{head} {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu_vs_peak']:.1%} | "
                     f"{r['peak_memory_gib']:.1f} | {_scaling(r, 1)} | {_scaling(r, 2)} |")
    return "\n".join(lines)


def plot(reports: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows(reports) if r.get("status") == "ok"]
    seqs = sorted({r["seq"] for r in done})
    fig, axes = plt.subplots(1, len(seqs), figsize=(6 * len(seqs), 4), squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        runs = [r for r in done if r["seq"] == seq]
        bars = ax.bar(range(len(runs)), [r["tokens_per_s_per_gpu"] for r in runs],
                      color=["#4060c0" if r["variant"].startswith("te") else "#2e7d32" for r in runs])
        for bar, r in zip(bars, runs):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['mfu_vs_peak']:.0%}",
                    ha="center", va="bottom", fontsize=7)
        ax.axhline(TORCHTITAN_8B_BF16, color="#888888", linestyle="--", label="torchtitan bf16 (8 x H100)")
        ax.axhline(TORCHTITAN_8B_FP8, color="#c06040", linestyle=":", label="torchtitan Float8 (8 x H100)")
        ax.set_xticks(range(len(runs)), [f"{r['variant']} {r['layout']}" for r in runs], rotation=45, ha="right",
                      fontsize=7)
        ax.set_title(f"seq {seq} (MFU on each bar)", fontsize=10)
        ax.set_ylabel("tokens / s per GPU")
        ax.legend(fontsize=7)
    gpu = reports[0]["versions"].get("gpu", "GPU")
    fig.suptitle(f"8B training step by layout, {gpu}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot", default=None, help="also write this image (needs matplotlib)")
    args = parser.parse_args(argv)
    reports = [json.load(open(path)) for path in args.results]
    print(table(reports))
    if args.plot:
        plot(reports, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
