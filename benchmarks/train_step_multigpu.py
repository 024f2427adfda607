"""Training-step benchmark on several GPUs of one host: train_step.py's model shapes, FLOP count,
timing and JSON, with the crosschip model split over a ``(dp, tp)`` mesh (FSDP2 over ``dp``,
tensor parallelism over ``tp``, sequence parallel by default when ``tp > 1``).

One launch measures one (variant, layout, seq); torchrun starts it, every rank builds its shards
through the public path (``Runtime(parallel=ParallelSpec(...))``, ``build_model``, ``init_weights``,
``finalize``), rank 0 writes the JSON:

    torchrun --nproc_per_node 8 benchmarks/train_step_multigpu.py --variant torch --layout dp4xtp2 \\
        --shape 8b --seq 4096 --out benchmarks/results/multigpu_8b_torch_dp4xtp2.json

Without torchrun the script is a driver: it launches each (seq, variant, layout) in its own torchrun
(so memory and compile caches do not mix) and merges their JSON, as train_step.py's main does:

    python benchmarks/train_step_multigpu.py --shape 8b --seq 4096 8192 --variants torch te-bf16 \\
        --layouts dp8 dp4xtp2 dp2xtp4 --activation-checkpointing selective te-bf16=full \\
        --baseline benchmarks/results/train_step_8b_1gpu.json --out benchmarks/results/multigpu_8b.json

Batch: each data-parallel replica takes ``max(1, 4096 // seq)`` sequences of the global batch, as
train_step.py takes on its one GPU (``--global-batch`` sets it in sequences, for runs that must
see the same data at every layout). Tokens/s per GPU is global tokens / step time / world size,
as torchtitan reports it; with ``tp > 1`` a GPU therefore sees ``1 / tp`` of train_step.py's
tokens per step. A step's time is the slowest rank's. MFU is against the 989 TFLOP/s bf16 peak,
FP8 runs included (labelled). ``--baseline`` takes result files of train_step.py (one GPU) or of
this script (e.g. two GPUs) and adds, per run, the per-GPU tokens/s over each baseline's of the
same variant and seq on fewer GPUs: its scaling efficiency. The driver's own runs on fewer GPUs
count as baselines too, so one driver command with ``--layouts dp1 tp2 dp8`` holds them all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py beside this file
from train_step import (PEAK_TFLOPS, SHAPES, TOKENS_PER_STEP, backends_used, build, failure,  # noqa: E402
                        flops_per_token, llama_config, matmul_tflops, timed_steps, versions)

#: The train_step.py variants that can be split over a mesh (same names, so baselines match).
VARIANTS = ["torch", "torch-compile", "te-bf16", "te-fp8"]
LAYOUT = re.compile(r"^(?:dp(\d+))?x?(?:tp(\d+))?$")


def parse_layout(text: str) -> tuple[int, int]:
    """``dp8``, ``dp4xtp2``, ``tp2`` -> ``(dp, tp)``."""
    match = LAYOUT.match(text)
    if not text or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected dpM, tpN or dpMxtpN (e.g. dp4xtp2)")
    dp, tp = (int(g) if g else 1 for g in match.groups())
    if dp < 1 or tp < 1:
        raise argparse.ArgumentTypeError(f"layout {text!r}: degrees must be at least 1")
    return dp, tp


def layout_name(dp: int, tp: int) -> str:
    return "x".join([f"dp{dp}"] * (dp > 1 or tp == 1) + [f"tp{tp}"] * (tp > 1))


def checkpointing_table(parser, given: list[str], settings) -> dict:
    """``--activation-checkpointing`` as train_step.py takes it (``SETTING`` for every run,
    ``VARIANT=SETTING`` for one variant), and ``VARIANT@LAYOUT=SETTING`` for one layout of a
    variant, since the best setting that fits one GPU is rarely the best on eight. Returns
    ``{(variant or None, layout or None): setting}``; later entries replace equal keys."""
    table = {}
    for entry in given:
        key, _, setting = entry.rpartition("=")
        variant, _, layout = key.partition("@")
        try:
            parsed = parse_layout(layout) if layout else None
        except argparse.ArgumentTypeError:
            parsed = False
        if (setting not in settings or (variant and variant not in VARIANTS) or parsed is False
                or (layout and not variant)):
            parser.error(f"--activation-checkpointing {entry!r}: expected SETTING, VARIANT=SETTING or "
                         f"VARIANT@LAYOUT=SETTING with SETTING one of {', '.join(settings)}, VARIANT one of "
                         f"{', '.join(VARIANTS)} and LAYOUT as --layouts takes it")
        table[(variant or None, parsed)] = setting
    return table


def checkpointing_for(table: dict, variant: str, layout: tuple[int, int]) -> str:
    """The most specific entry: variant and layout, then variant, then every run ("none")."""
    for key in ((variant, layout), (variant, None), (None, None)):
        if key in table:
            return table[key]
    return "none"


def skip_reason(variant: str, device: str) -> str | None:
    """Why ``variant`` cannot run on ``device`` at all (recorded instead of a failure)."""
    if variant.startswith("te") and device != "cuda":
        return "Transformer Engine runs on CUDA only"
    return None


# -- one launch: every rank of torchrun runs this ------------------------------------------------
def launched(args) -> int:
    import torch
    import torch.distributed as dist

    from crosschip.parallel.distributed import DP_DIM, join_launched_group, shutdown
    from crosschip.specs import ParallelSpec

    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)  # ranks share the host's cores
    join_launched_group(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp, tp = args.layout
    run = identity(args, args.variant, args.layout, args.seq)
    config = llama_config(args.shape, args.seq)
    try:
        if dp * tp != world:
            raise ValueError(f"layout {layout_name(dp, tp)} needs {dp * tp} processes, torchrun started {world}")
        if reason := skip_reason(args.variant, args.device):
            run.update(status="skipped", reason=reason)
            raise _Done
        if run["global_batch"] % dp:
            raise ValueError(f"--global-batch {run['global_batch']} is not divisible by dp={dp}")
        parallel = ParallelSpec(tp=tp, dp=dp, sequence_parallel=run["sequence_parallel"])
        model = build(args.variant, config, args.seed, run["activation_checkpointing"], device=args.device,
                      dtype=args.dtype, parallel=parallel)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
        if run["optimizer_in_backward"]:  # as `crosschip train --optimizer-in-backward` does
            from crosschip.training.in_backward import step_in_backward

            step_in_backward(optimizer)
        # Every rank draws the same global batch, then keeps its data-parallel replica's rows.
        gen = torch.Generator(device=args.device).manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (run["global_batch"], args.seq), device=args.device,
                            generator=gen)
        part = ids.chunk(dp)[model.runtime.device_mesh.get_local_rank(DP_DIM)] if dp > 1 else ids
        times, losses = timed_steps(model, optimizer, part, args.warmup, args.steps, run, device=args.device,
                                    return_logits=False)
        mine = dict(times=times, losses=losses, warmup_s=run["warmup_s"], peak_memory_gib=peak_memory_gib(args))
        ranks: list = [None] * world
        dist.all_gather_object(ranks, mine)
        if rank == 0:
            summarise(run, ranks, config, args, model)
    except _Done:
        pass
    except Exception as exc:  # noqa: BLE001 - recorded; on OOM the other ranks wait in a collective and torchrun ends them
        recorded = failure(exc)
        return _failed(args, run, rank, recorded["status"], recorded["error"])
    if rank == 0:
        add_scaling([run], baselines(args.baseline))
        write(args.out, report(args, [run]))
    shutdown()
    return 0


class _Done(Exception):
    """A run that ends before training (skipped), with its record complete."""


def _failed(args, run: dict, rank: int, status: str, error: str) -> int:
    """Each failing rank writes its own record beside ``--out`` and exits non-zero, so torchrun
    stops the ranks still waiting on it; the driver reads the record."""
    run.update(status=status, error=error, rank=rank)
    if args.out:
        write(f"{args.out}.rank{rank}", report(args, [run]))
    print(f"rank {rank}: {status}: {error}", file=sys.stderr, flush=True)
    return 1


def identity(args, variant: str, layout: tuple[int, int], seq: int) -> dict:
    dp, tp = layout
    local = max(1, TOKENS_PER_STEP // seq)
    return dict(variant=variant, layout=layout_name(dp, tp), dp=dp, tp=tp, world_size=dp * tp, seq=seq,
                sequence_parallel=tp > 1 and not args.no_sequence_parallel,
                global_batch=args.global_batch or dp * local, device=args.device, dtype=args.dtype,
                optimizer_in_backward=args.optimizer_in_backward,
                activation_checkpointing=checkpointing_for(args.activation_checkpointing, variant, layout))


def peak_memory_gib(args) -> float:
    """This rank's peak: allocated CUDA memory since the timed steps began, or on the CPU the
    process's peak resident set (``ru_maxrss``, KiB on Linux: the whole run, imports included)."""
    if args.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def summarise(run: dict, ranks: list[dict], config, args, model) -> None:
    """Rank 0's record from every rank's times, losses and memory."""
    # A step ends when its slowest rank ends; FSDP's collectives keep the ranks within a step.
    times = [max(r["times"][i] for r in ranks) for i in range(args.steps)]
    # Equal-sized replicas: the global batch's mean loss is the mean of the ranks' (the tp ranks
    # of a replica hold the same loss, so averaging every rank weighs each replica equally).
    losses = [statistics.fmean(r["losses"][i] for r in ranks) for i in range(args.steps)]
    median = statistics.median(times)
    per_token, matmul_params = flops_per_token(config, args.seq)
    tokens = run["global_batch"] * args.seq
    achieved = per_token * tokens / median / 1e12 / run["world_size"]  # per GPU
    rate = matmul_tflops() if args.device == "cuda" else None
    peaks = [r["peak_memory_gib"] for r in ranks]
    run.update(
        status="ok", step_s_median=median, step_s_all=times, step_s_per_rank=[r["times"] for r in ranks],
        warmup_s=max(r["warmup_s"] for r in ranks), tokens_per_step=tokens, tokens_per_s=tokens / median,
        tokens_per_s_per_gpu=tokens / median / run["world_size"], tflops_per_gpu=achieved,
        mfu_vs_peak=achieved / PEAK_TFLOPS, matmul_tflops=rate, mfu_vs_matmul=achieved / rate if rate else None,
        mfu_basis="bf16 dense peak" + (" (an FP8 run, stated against bf16)" if run["variant"] == "te-fp8" else ""),
        peak_memory_gib=max(peaks), peak_memory_gib_per_rank=peaks,
        memory_basis="torch.cuda.max_memory_allocated" if args.device == "cuda" else "host peak RSS (ru_maxrss)",
        matmul_params=matmul_params, losses=losses, losses_per_rank=[r["losses"] for r in ranks],
        backends=backends_used(model))


# -- results --------------------------------------------------------------------------------------
def report(args, runs: list[dict]) -> dict:
    return {"command": " ".join([_launcher(), *sys.argv]), "versions": versions(), "shape": args.shape,
            "config": SHAPES[args.shape], "tokens_per_step_per_replica": TOKENS_PER_STEP,
            "peak_tflops": PEAK_TFLOPS, "runs": runs}


def _launcher() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '?')}"
    return "python"


def write(path, data: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def baselines(files: list[str]) -> list[dict]:
    """The finished runs of result files from train_step.py (one GPU) or this script."""
    return [dict(run, file=path) for path in files for run in json.loads(Path(path).read_text())["runs"]]


def add_scaling(runs: list[dict], bases: list[dict]) -> None:
    """Per finished run, ``scaling``: its per-GPU tokens/s over that of every finished baseline
    run of the same variant and seq on fewer GPUs, with the baseline's layout and checkpointing."""
    for run in runs:
        if run.get("status") != "ok":
            continue
        run["scaling"] = []
        for base in bases:
            world = base.get("world_size", 1)  # train_step.py's runs: one GPU
            if (base.get("status") != "ok" or (base["variant"], base["seq"]) != (run["variant"], run["seq"])
                    or world >= run["world_size"]):
                continue
            per_gpu = base.get("tokens_per_s_per_gpu", base["tokens_per_s"])
            run["scaling"].append(dict(
                file=base.get("file"), layout=base.get("layout", "1 GPU"), world_size=world,
                activation_checkpointing=base.get("activation_checkpointing"), tokens_per_s_per_gpu=per_gpu,
                efficiency=run["tokens_per_s_per_gpu"] / per_gpu))


# -- driver: one torchrun per (seq, variant, layout) -----------------------------------------------
def drive(args) -> int:
    runs, files = [], baselines(args.baseline)
    merged = report(args, runs)
    merged["activation_checkpointing"] = {
        f"{v}@{layout_name(*layout)}": checkpointing_for(args.activation_checkpointing, v, layout)
        for v in args.variants for layout in args.layouts}
    for seq in args.seq:
        for variant in args.variants:
            for layout in args.layouts:
                run = launch(args, variant, layout, seq)
                runs.append(run)
                print(describe(args.shape, run), flush=True)
                add_scaling(runs, files + runs)  # this driver's runs on fewer GPUs are baselines too
                write(args.out, merged)  # after every run, so a cut-off session keeps what finished
    return 0


def launch(args, variant: str, layout: tuple[int, int], seq: int) -> dict:
    """One torchrun of this script for one run; its record, or why it has none."""
    dp, tp = layout
    if reason := skip_reason(variant, args.device):  # no need to start the ranks to know
        return dict(identity(args, variant, layout, seq), status="skipped", reason=reason)
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "run.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(dp * tp),
               __file__, "--variant", variant, "--layout", layout_name(dp, tp), "--shape", args.shape,
               "--seq", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--device", args.device, "--dtype", args.dtype, "--cpu-threads", str(args.cpu_threads),
               "--activation-checkpointing", checkpointing_for(args.activation_checkpointing, variant, layout),
               "--out", out]
        cmd += ["--global-batch", str(args.global_batch)] if args.global_batch else []
        cmd += ["--no-sequence-parallel"] if args.no_sequence_parallel else []
        cmd += ["--optimizer-in-backward"] if args.optimizer_in_backward else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        records = sorted(Path(scratch).glob("run.json*"))  # run.json, or run.json.rankN of failed ranks
        if records:
            run = json.loads(records[0].read_text())["runs"][0]
        else:
            run = dict(identity(args, variant, layout, seq), status="crashed", error=proc.stderr[-3000:])
    run["command"] = "torchrun " + " ".join(cmd[3:])
    return run


def describe(shape: str, run: dict) -> str:
    head = f"{shape} seq {run['seq']:5d} {run['variant']:14s} {run['layout']:8s}"
    if run.get("status") != "ok":
        return f"{head} {run.get('status')}: {(run.get('error') or run.get('reason') or '')[:300]}"
    scaling = "  ".join(f"x{s['efficiency']:.2f} vs {s['layout']}" for s in run.get("scaling", []))
    return (f"{head} {run['tokens_per_s_per_gpu']:10,.0f} tok/s/GPU  MFU {run['mfu_vs_peak']:.1%} of 989  "
            f"peak {run['peak_memory_gib']:.1f} GiB  {scaling}")


def main(argv=None) -> int:
    from crosschip.specs import CHECKPOINTING

    under_torchrun = "WORLD_SIZE" in os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["torch", "te-bf16", "te-fp8"])
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=[(8, 1), (4, 2), (2, 4)],
                        metavar="LAYOUT", help="dpM, tpN or dpMxtpN; world size dp x tp")
    parser.add_argument("--variant", choices=VARIANTS, help="one launch under torchrun: this variant")
    parser.add_argument("--layout", type=parse_layout, help="one launch under torchrun: this layout")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step over all replicas (default: dp x max(1, 4096 // seq))")
    parser.add_argument("--no-sequence-parallel", action="store_true", help="tp without sequence parallelism")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="step each parameter in the backward pass, freeing its gradient (every variant)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, for smoke tests")
    parser.add_argument("--dtype", choices=["bf16", "float32"], default="bf16",
                        help="parameter dtype (float32 for CPU smoke tests, where bf16 is slow)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads per rank on the CPU")
    parser.add_argument("--activation-checkpointing", nargs="+", default=["none"],
                        metavar="[VARIANT[@LAYOUT]=]SETTING",
                        help=f"{', '.join(CHECKPOINTING)}: one for every run, and/or VARIANT=SETTING for one variant, "
                             "VARIANT@LAYOUT=SETTING for one variant at one layout (the most specific wins)")
    parser.add_argument("--baseline", nargs="*", default=[], metavar="JSON",
                        help="train_step.py or train_step_multigpu.py results to compute scaling against")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    args.activation_checkpointing = checkpointing_table(parser, args.activation_checkpointing, CHECKPOINTING)
    if under_torchrun:
        if args.variant is None or args.layout is None or len(args.seq) != 1:
            parser.error("under torchrun give one --variant, one --layout and one --seq")
        args.seq = args.seq[0]
        return launched(args)
    if args.variant or args.layout:
        parser.error("--variant/--layout are for a launch under torchrun; the driver takes --variants/--layouts")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
