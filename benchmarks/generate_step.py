"""Generation benchmark on one GPU: new tokens/s of ``generate`` for transformers'
LlamaForCausalLM (its dynamic cache, and its static cache with the forward it compiles) and for
crosschip's torch and te backends through the public options ``generate(cache=, compile=)``
(``compile=True``: torch.compile; ``compile="cuda-graph"``: the eager step as a CUDA graph),
all given identical weights (``crosschip.weights.init.canonical_tensor``).

    python benchmarks/generate_step.py --out benchmarks/results/generate_1b.json
    python benchmarks/generate_step.py --shape tiny --prompt 8 --new-tokens 4 --batch 2 \\
        --variants transformers-dynamic torch-static --runs 1 --warmup 0      # CPU smoke run

Greedy, no eos (the generation config's eos is cleared), so every run makes exactly
``--new-tokens`` tokens per row; the prompt is ``--prompt`` random tokens, no padding. New
tokens/s = batch x new tokens / wall time of one ``generate`` call (prompt included), the median
of ``--runs`` timed calls after ``--warmup`` untimed ones (which pay compilation and CUDA-graph
capture). Each (variant, batch) runs in its own process, as in train_step.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from train_step import SHAPES, backends_used, failure, in_own_process, llama_config, versions, write_report

VARIANTS = ["transformers-dynamic", "transformers-static", "torch-dynamic", "torch-static",
            "torch-static-compile", "torch-static-cudagraph", "te-dynamic", "te-static-compile",
            "te-static-cudagraph"]


def build(variant: str, config, seed: int, device: str):
    import torch

    from crosschip.weights.init import canonical_tensor

    if variant.startswith("transformers"):
        from transformers import LlamaForCausalLM

        config._attn_implementation = "sdpa"
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(canonical_tensor(name, tuple(p.shape), seed, device=device, dtype=p.dtype))
        model.generation_config.eos_token_id = None  # every run makes all its tokens
        model.generation_config.pad_token_id = 0
        return model.eval()
    from crosschip.checkpoint.loading import build_model
    from crosschip.models import model_class
    from crosschip.runtime import Runtime
    from crosschip.weights.init import init_weights

    backend = variant.split("-")[0]
    runtime = Runtime(backend, device=device, dtype="bf16", strict=True)
    model = build_model(model_class("LlamaForCausalLM"), config, runtime)
    init_weights(model, seed=seed, device=device)
    return model.eval()


def generate_call(variant: str, model, new_tokens: int):
    """The call timed for ``variant``: what a user writes for that setting."""
    if variant == "transformers-dynamic":
        return lambda ids, mask: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, do_sample=False, disable_compile=True)
    if variant == "transformers-static":
        from transformers import CompileConfig

        # The static cache; on CUDA generate compiles the forward with this config
        # (mode="reduce-overhead": CUDA graphs), transformers' fastest documented setting.
        return lambda ids, mask: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, do_sample=False,
                                                cache_implementation="static", compile_config=CompileConfig())
    cache = "dynamic" if variant.endswith("dynamic") else "static"
    # -compile: generate(compile=True), torch.compile's CUDA graphs; -cudagraph: compile="cuda-graph",
    # the eager step recorded as a CUDA graph without torch.compile.
    compile = {"compile": True, "cudagraph": "cuda-graph"}.get(variant.rsplit("-", 1)[-1], False)
    return lambda ids, mask: model.generate(ids, max_new_tokens=new_tokens, attention_mask=mask,
                                            cache=cache, compile=compile)


def worker(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(args.shape, args.prompt + args.new_tokens)
    result = dict(variant=args.variant, shape=args.shape, batch=args.batch, prompt=args.prompt,
                  new_tokens=args.new_tokens, device=device)
    try:
        model = build(args.variant, config, args.seed, device)
        call = generate_call(args.variant, model, args.new_tokens)
        gen = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt), device=device, generator=gen)
        mask = torch.ones_like(ids)

        def timed() -> tuple[float, torch.Tensor]:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = call(ids, mask)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, out

        warmup = [timed()[0] for _ in range(args.warmup)]
        times = []
        for _ in range(args.runs):
            seconds, out = timed()
            times.append(seconds)
            made = out.shape[1] - args.prompt
            if made != args.new_tokens:
                raise RuntimeError(f"{args.variant} made {made} new tokens, expected {args.new_tokens}")
        median = statistics.median(times)
        result.update(status="ok", seconds_median=median, seconds_all=times, warmup_seconds=warmup,
                      new_tokens_per_s=args.batch * args.new_tokens / median)
        if device == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if hasattr(model, "runtime"):
            result["backends"] = backends_used(model)
    except Exception as exc:  # noqa: BLE001 - recorded (failure), the other variants still run
        result.update(failure(exc))
    return result


def relative_to_transformers(runs: list[dict]) -> None:
    """Each run's new tokens/s over transformers' best setting at the same batch."""
    for batch in {r["batch"] for r in runs}:
        theirs = [r for r in runs if r["batch"] == batch and r["status"] == "ok"
                  and r["variant"].startswith("transformers")]
        if not theirs:
            continue
        best = max(theirs, key=lambda r: r["new_tokens_per_s"])
        for r in runs:
            if r["batch"] == batch and r["status"] == "ok":
                r["vs_transformers_best"] = r["new_tokens_per_s"] / best["new_tokens_per_s"]
                r["transformers_best"] = best["variant"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--runs", type=int, default=3, help="timed generate calls (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation, graph capture)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, found {args.runs}")
    if args.worker:
        args.batch = args.batch[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    runs = []
    report = {"command": "python " + " ".join(sys.argv), "versions": versions(), "shape": args.shape,
              "config": SHAPES[args.shape], "dtype": "bf16", "prompt": args.prompt, "new_tokens": args.new_tokens,
              "decoding": "greedy, no eos", "runs": runs}
    for batch in args.batch:
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--shape", args.shape,
                   "--batch", str(batch), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
                   "--runs", str(args.runs), "--warmup", str(args.warmup), "--seed", str(args.seed)]
            if args.device:
                cmd += ["--device", args.device]
            run = in_own_process(cmd, dict(variant=variant, batch=batch))
            runs.append(run)
            relative_to_transformers(runs)
            if run.get("status") == "ok":
                ratio = run.get("vs_transformers_best")
                print(f"{args.shape} batch {batch:3d} {variant:22s} {run['new_tokens_per_s']:10,.0f} new tok/s"
                      + (f"  {ratio:.2f}x transformers' best" if ratio else ""), flush=True)
            else:
                print(f"{args.shape} batch {batch:3d} {variant:22s} {run['status']}: {run.get('error', '')[:300]}",
                      flush=True)
            write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
