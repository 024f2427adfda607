"""Memory and I/O of a tensor-parallel load on CPU: a Llama checkpoint of about 870 MB loaded at
tp=2 (gloo), reporting per rank the peak resident memory during the load as a fraction of the
checkpoint size (target: under 0.6) and the bytes read from the checkpoint (target: about its
share).

    python benchmarks/tp_load_memory.py --out benchmarks/results/tp_load_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
              rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def _status_mib() -> dict[str, float]:
    """VmHWM (peak resident), VmRSS, RssAnon (private memory) and RssFile (mapped file pages,
    here the safetensors mmap: shared page cache, not memory the rank owns) in MiB. VmHWM, unlike
    getrusage's ru_maxrss, starts afresh at exec, so the parent's memory does not leak in."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) / 1024
    return out


def _reset_peak() -> bool:
    """Restart VmHWM at the current RSS (Linux: ``5`` to ``/proc/self/clear_refs``), so the peak
    seen afterwards is the load's own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_checkpoint(path: Path, config: dict = CONFIG) -> int:
    from transformers import LlamaConfig

    from crosschip.weights.init import init_weights
    from crosschip.checkpoint.loading import build_model
    from crosschip.models import model_class
    from crosschip.runtime import Runtime

    model = build_model(model_class("LlamaForCausalLM"), LlamaConfig(**config), Runtime("reference", device="cpu"))
    init_weights(model, seed=0)
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


#: A small model of the same architecture, loaded first: the modules a load imports lazily
#: (transformers' config classes, DTensor, the parallel plan) and the process group's buffers
#: are then in place, so the measurement sees what loading the large checkpoint itself costs.
WARMUP = dict(CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2)


def worker(rank: int, world: int, path: str, warmup: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import crosschip

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    small = crosschip.from_pretrained(warmup, backend="torch", tp=world)
    del small
    import gc

    gc.collect()
    peak_reset = _reset_peak()
    before = _status_mib()
    model = crosschip.from_pretrained(path, backend="torch", tp=world)
    after = _status_mib()
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in model.parameters())
    result = dict(rank=rank, before_load_mib=before, after_load_mib=after,
                  peak_rss_mib=after["VmHWM"], baseline_rss_mib=before["VmRSS"], peak_reset=peak_reset,
                  load_anon_increase_mib=after["RssAnon"] - before["RssAnon"],
                  bytes_read=model.checkpoint_bytes_read, bytes_held=held)
    with open(f"{out}.rank{rank}", "w") as fh:
        json.dump(result, fh)
    del model
    from crosschip.parallel.distributed import shutdown

    shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        size = make_checkpoint(path)
        make_checkpoint(Path(tmp) / "warmup", WARMUP)
        stem = str(Path(tmp) / "result")
        mp.spawn(worker, args=(args.tp, str(path), str(Path(tmp) / "warmup"), stem), nprocs=args.tp, join=True)
        ranks = [json.load(open(f"{stem}.rank{r}")) for r in range(args.tp)]
    mib = size / 2**20
    for r in ranks:
        r["peak_rss_fraction_of_checkpoint"] = r["peak_rss_mib"] / mib
        r["load_peak_rss_fraction_of_checkpoint"] = (r["peak_rss_mib"] - r["baseline_rss_mib"]) / mib
        r["load_anon_fraction_of_checkpoint"] = r["load_anon_increase_mib"] / mib
        r["bytes_read_fraction_of_checkpoint"] = r["bytes_read"] / size
        print(f"rank {r['rank']}: checkpoint {mib:.0f} MiB; peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(baseline {r['baseline_rss_mib']:.0f}; the load's peak adds "
              f"{r['load_peak_rss_fraction_of_checkpoint']:.2f} of the checkpoint, of which private memory "
              f"{r['load_anon_fraction_of_checkpoint']:.2f}, the rest mapped file pages); read "
              f"{r['bytes_read_fraction_of_checkpoint']:.2f} of the checkpoint, holds {r['bytes_held'] / 2**20:.0f} MiB")
    report = dict(command="python " + " ".join(sys.argv), checkpoint_bytes=size, tp=args.tp, config=CONFIG,
                  ranks=ranks, note=("a small model is loaded first (imports, process group); VmHWM is then reset, so "
                  "peak RSS minus the baseline is the load's own. Peak RSS (VmHWM) includes the Python/torch baseline and the safetensors mmap's "
                  "file pages (shared page cache); RssAnon is the memory the rank owns"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
