"""LoRA training-step benchmark on one GPU: forward + backward + fused AdamW of the adapter of a
Llama-shaped model (r 16 on every linear projection, bf16), transformers + PEFT against
crosschip's backends, all given identical base weights and identical adapter weights.

    python benchmarks/lora_step.py --shape 1b 8b --out benchmarks/results/lora_step_h200.json

Each (variant, shape) runs in its own process (peak memory and compile caches do not mix).
Variants: ``peft`` (transformers' LlamaForCausalLM, sdpa, with peft.get_peft_model), ``torch``,
``torch-compile`` (the torch backend, the model under torch.compile) and ``te`` (Transformer
Engine's QKV with its fused norm and its output projection; the gated MLP on the torch backend,
since te.LayerNormMLP takes no adapters). MFU counts only what a LoRA step computes: the
forward of the base and the backward through it to its inputs (no base weight gradients), i.e.
4 x non-embedding parameters + 12 x layers x hidden x seq FLOPs per token (the adapters' FLOPs
are below 1% and left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import (  # noqa: E402
    PEAK_TFLOPS, SHAPES, flops_per_token, in_own_process, llama_config, matmul_tflops, timed_steps, versions,
    write_report, backends_used, failure)

VARIANTS = ["peft", "torch", "torch-compile", "te"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 16, 32
SEQ, TOKENS_PER_STEP = 2048, 4096


def _fill_adapter(named, seed: int):
    """The same adapter on both sides: every lora tensor from its PEFT file name and the seed
    (lora_B non-zero, so the adapter path computes what a trained adapter does)."""
    import torch

    from crosschip.weights.init import canonical_tensor

    with torch.no_grad():
        for name, p in named:
            p.copy_(canonical_tensor(name, tuple(p.shape), seed, device=p.device, dtype=torch.float32).to(p.dtype))


def build(variant: str, config, seed: int):
    if variant == "peft":
        import peft

        import train_step

        model = train_step.build("transformers", config, seed, "none")  # the same base weights
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS)))
        _fill_adapter([(n.replace(".default", ""), p) for n, p in model.named_parameters() if "lora_" in n], seed)
        return model.train(), model
    import crosschip
    from crosschip.weights.init import init_weights
    from crosschip.checkpoint.loading import build_model
    from crosschip.models import model_class
    from crosschip.runtime import Runtime

    backend = "te" if variant == "te" else "torch"
    runtime = Runtime(backend, device="cuda", dtype="bf16", strict=True,
                      components={"gated_mlp": "torch"} if variant == "te" else None)
    model = build_model(model_class("LlamaForCausalLM"), config, runtime)
    init_weights(model, seed=seed, device="cuda")
    model.add_adapter(crosschip.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
    _fill_adapter([(k, p) for s in model.lora_adapter.slots.values() for k, p in s.peft_tensors().items()], seed)
    from crosschip.modeling.compilation import compile_model

    compile_model(model, variant == "torch-compile")  # what from_pretrained(compile=True) and --compile do
    return model.train(), model


def worker(args) -> dict:
    import torch

    config = llama_config(args.shape, SEQ)
    batch = TOKENS_PER_STEP // SEQ
    result = dict(variant=args.variant, shape=args.shape, seq=SEQ, batch=batch, r=R, alpha=ALPHA,
                  targets=list(TARGETS))
    try:
        step_model, model = build(args.variant, config, args.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, SEQ), device="cuda", generator=gen)

        times, losses = timed_steps(step_model, optimizer, ids, args.warmup, args.steps, result)
        median = statistics.median(times)
        full, matmul_params = flops_per_token(config, SEQ)
        per_token = full - 2 * matmul_params  # no weight gradients of the frozen base
        tokens = batch * SEQ
        achieved = per_token * tokens / median / 1e12
        result.update(status="ok", step_s_median=median, step_s_all=times, tokens_per_s=tokens / median,
                      tflops=achieved, mfu_vs_peak=achieved / PEAK_TFLOPS, matmul_tflops=matmul_tflops(),
                      peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, losses=losses)
        if args.variant != "peft":
            result["backends"] = backends_used(model)
    except Exception as exc:  # noqa: BLE001 - recorded (failure), the other variants still run
        result.update(failure(exc))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.shape = args.shape[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    runs = []
    report = {"command": "python " + " ".join(sys.argv), "versions": versions(), "seq": SEQ,
              "tokens_per_step": TOKENS_PER_STEP, "peak_tflops": PEAK_TFLOPS, "runs": runs}
    for shape in args.shape:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--shape", shape,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
            run = in_own_process(cmd, dict(variant=variant, shape=shape))
            runs.append(run)
            base = next((r for r in runs if r["shape"] == shape and r["variant"] == "peft"
                         and r.get("status") == "ok"), None)
            if run.get("status") == "ok":
                if base:
                    run["speedup_vs_peft"] = run["tokens_per_s"] / base["tokens_per_s"]
                    run["memory_vs_peft"] = run["peak_memory_gib"] / base["peak_memory_gib"]
                print(f"{shape} {variant:14s} {run['tokens_per_s']:10,.0f} tok/s  x{run.get('speedup_vs_peft', 1):.2f}"
                      f"  MFU {run['mfu_vs_peak']:.1%}  peak {run['peak_memory_gib']:.1f} GiB", flush=True)
            else:
                print(f"{shape} {variant:14s} {run['status']}: {run.get('error', '')[:600]}", flush=True)
            write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
