"""Load benchmark: from ``from_pretrained`` to a ready model (weights on the device, CUDA
synchronised) for transformers and crosschip's backends, from a random-weights Llama checkpoint in
bf16, with a warm page cache.

    python benchmarks/load.py --shape 8b --dir /tmp/crosschip-load-8b \\
        --out benchmarks/results/load_8b_h200.json
    python benchmarks/load.py --shape tiny --dir /tmp/crosschip-load-tiny --device cpu   # seconds

The checkpoint is written once into ``--dir`` (kept, and reused when present: delete it when
done; 8B is 16 GB), one tensor at a time (``random_checkpoint.py``). Every file is then read once
so the page cache is warm. Each (variant, repeat) runs in its own fresh process, which first loads
a tiny checkpoint of the same architecture (``--dir`` + ``-warmup``) untimed, so lazy imports,
plugin discovery and the CUDA context are in place (their time is reported as ``warmup_s``) and
the clock sees what loading the large checkpoint itself costs. Reported per
variant: the median of ``--repeats`` runs in seconds and in GB/s (checkpoint tensor bytes / s),
the peak host resident memory during the load (VmHWM, reset after the set-up; the load's own
growth beside it) and the peak GPU memory allocated. After the clock stops, the first layer's
weights are compared bitwise with the file, so a fast wrong load cannot pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_checkpoint import checkpoint_bytes, write_checkpoint  # noqa: E402
from train_step import SHAPES, llama_config, versions  # noqa: E402

VARIANTS = ["transformers", "torch", "te"]


def _status_gib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) / 2**20
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM restarts at the current RSS
        return True
    except OSError:
        return False


def warm_page_cache(directory: Path) -> float:
    """Read every checkpoint file once; returns the seconds it took (a cold read, if it was)."""
    start = time.perf_counter()
    block = bytearray(64 * 2**20)
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(block):
                pass
    return time.perf_counter() - start


def _verify_first_layer(model, directory: Path, variant: str) -> int:
    """Compare every weight of layer 0 (and the embedding) with the file, bitwise; returns how
    many tensors were compared."""
    import torch
    from safetensors import safe_open

    from crosschip.checkpoint import SafetensorsCheckpoint

    source = SafetensorsCheckpoint(directory)
    wanted = [k for k in source.keys() if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
    if variant == "transformers":
        state = model.state_dict()
        loaded = {k: state[k] for k in wanted}
    else:
        from crosschip import weights

        loaded = {}
        for b in weights.bindings(model):
            if set(b.hf_shapes) & set(wanted):
                loaded.update(b.to_hf({k: v for k, v in b.module.state_dict().items()
                                       if not k.endswith(weights.EXTRA_STATE)}))
    for key in wanted:
        with safe_open(str(source.key_to_file[key]), framework="pt") as fh:
            expected = fh.get_tensor(key)
        got = loaded[key].detach().to("cpu")
        if got.dtype != expected.dtype or not torch.equal(got, expected):
            raise AssertionError(f"{variant}: {key} differs from {source.describe(key)} after loading")
    return len(wanted)


def _load(variant: str, directory: str, device: str):
    """The timed call: from_pretrained to a model whose weights are on the device."""
    import torch

    if variant == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map=device)
    else:
        import crosschip

        model = crosschip.from_pretrained(directory, backend=variant, device=device, dtype=torch.bfloat16,
                                          strict=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model


def worker(args) -> dict:
    import torch

    result = dict(variant=args.variant, device=args.device)
    cuda = args.device.startswith("cuda")
    if args.variant == "te":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            return dict(result, status="unavailable", error="transformer_engine is not installed")
    start = time.perf_counter()
    _load(args.variant, args.dir + "-warmup", args.device)
    result["warmup_s"] = time.perf_counter() - start
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result["peak_reset"] = _reset_peak_rss()
    before = _status_gib()
    if args.variant != "transformers" and (args.piece_mib or args.buffers):  # tuning runs only
        from crosschip.checkpoint import staged_read

        staged_read.CHUNK_BYTES = int((args.piece_mib or staged_read.CHUNK_BYTES / 2**20) * 2**20)
        staged_read.BUFFERS = args.buffers or staged_read.BUFFERS
        result.update(piece_bytes=staged_read.CHUNK_BYTES, buffers=staged_read.BUFFERS)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    model = _load(args.variant, args.dir, args.device)
    seconds = time.perf_counter() - start
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
        result["profile"] = text.getvalue()[-12000:]
    after = _status_gib()
    size = checkpoint_bytes(args.dir)
    result.update(
        status="ok", seconds=seconds, gb_per_s=size / seconds / 1e9, checkpoint_bytes=size,
        peak_rss_gib=after["VmHWM"], baseline_rss_gib=before["VmRSS"],
        load_peak_rss_gib=after["VmHWM"] - before["VmRSS"], rss_after=after,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        param_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30)
    result["verified_tensors"] = _verify_first_layer(model, Path(args.dir), args.variant)
    return result


def _run(cmd: list[str], identity: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else dict(identity, status="crashed", error=proc.stderr[-3000:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--dir", default=None, help="checkpoint directory (written if absent; default "
                        "/tmp/crosschip-load-SHAPE)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--profile", action="store_true", help="cProfile each timed load (slower; the "
                        "top functions go into the JSON)")
    parser.add_argument("--piece-mib", type=float, default=None, help="crosschip's staged-read piece size "
                        "(tuning; default that of crosschip.checkpoint.staged_read)")
    parser.add_argument("--buffers", type=int, default=None, help="crosschip's staging buffers in flight (tuning)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dir = args.dir or f"/tmp/crosschip-load-{args.shape}"
    if args.worker:
        try:
            result = worker(args)
        except Exception as exc:  # recorded, so one failing variant does not hide the others
            result = dict(variant=args.variant, status="error", error=f"{type(exc).__name__}: {exc}"[:3000])
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    directory = Path(args.dir)
    for shape, where in ((args.shape, directory), ("tiny", Path(args.dir + "-warmup"))):
        if not (where / "config.json").is_file():  # written last: its presence means complete
            print(f"writing a random {shape} checkpoint (bf16) to {where}", flush=True)
            start = time.perf_counter()
            write_checkpoint(where, llama_config(shape, 8192), seed=args.seed,
                             device="cuda" if args.device.startswith("cuda") else "cpu",
                             log=lambda line: print(line, flush=True))
            print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    size = checkpoint_bytes(directory)
    print(f"warming the page cache: {size / 1e9:.1f} GB read in {warm_page_cache(directory):.1f} s", flush=True)

    report = {"command": "python " + " ".join(sys.argv), "versions": versions(), "shape": args.shape,
              "config": SHAPES[args.shape], "dtype": "bfloat16", "device": args.device,
              "checkpoint_bytes": size, "repeats": args.repeats, "summary": {}, "runs": []}
    for variant in args.variants:
        runs = []
        for repeat in range(args.repeats):
            cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--dir", str(directory),
                   "--device", args.device, "--shape", args.shape]
            cmd += (["--profile"] if args.profile else []) + (
                ["--piece-mib", str(args.piece_mib)] if args.piece_mib else []) + (
                ["--buffers", str(args.buffers)] if args.buffers else [])
            run = _run(cmd, dict(variant=variant))
            run["repeat"] = repeat
            runs.append(run)
            report["runs"].append(run)
            if run.get("status") != "ok":
                print(f"{variant:13s} {run['status']}: {run.get('error', '')[-500:]}", flush=True)
                break
            print(f"{variant:13s} run {repeat}: {run['seconds']:.2f} s  {run['gb_per_s']:.1f} GB/s  "
                  f"peak host RSS {run['peak_rss_gib']:.1f} GiB (load adds {run['load_peak_rss_gib']:.1f})"
                  + (f"  peak GPU {run['peak_gpu_gib']:.1f} GiB" if run["peak_gpu_gib"] is not None else ""),
                  flush=True)
        ok = [r for r in runs if r.get("status") == "ok"]
        if len(ok) == args.repeats:
            median = statistics.median(r["seconds"] for r in ok)
            report["summary"][variant] = dict(
                median_s=median, gb_per_s=size / median / 1e9,
                max_peak_rss_gib=max(r["peak_rss_gib"] for r in ok),
                max_load_peak_rss_gib=max(r["load_peak_rss_gib"] for r in ok),
                max_peak_gpu_gib=max((r["peak_gpu_gib"] or 0) for r in ok) if args.device != "cpu" else None)
            print(f"{variant:13s} median {median:.2f} s = {size / median / 1e9:.1f} GB/s", flush=True)
        if args.out:  # after every variant, so a cut-off session keeps what finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
