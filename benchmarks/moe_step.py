"""Mixture-of-experts training-step benchmark on one GPU: forward + backward + fused AdamW of an
OLMoE-1B-7B-shaped model (hidden 2048, 16 layers, 64 experts, top-8, expert intermediate 1024),
bf16, 2 x 2048 tokens per step, for transformers (its ``eager`` and ``grouped_mm`` experts) and
crosschip's torch backend (grouped GEMMs; eager and compiled). Every weight is drawn from the
same seeded scheme by name (``crosschip.weights.init.canonical_tensor``); transformers names its
experts stacked in memory, so their values (not their distribution) differ between the sides.

    python benchmarks/moe_step.py --out benchmarks/results/moe_step_olmoe_shape_h200.json

The architecture is Qwen3-MoE's (per-head q/k norms, softmax top-8 routing) at OLMoE-1B-7B's
sizes, on both sides. MFU counts active parameters: per token, the attention projections, the
router and top-k experts' three projections of every layer, and the LM head (6 x those + the
attention score FLOPs, 12 x layers x hidden x seq), over the bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import failure, in_own_process, matmul_tflops, timed_steps, versions, write_report  # noqa: E402

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
             moe_intermediate_size=1024, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
             vocab_size=50304, norm_topk_prob=False, tie_word_embeddings=False)
VARIANTS = ["transformers-eager", "transformers-grouped_mm", "torch", "torch-compile"]
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
BATCH, SEQ = 2, 2048


def config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(max_position_embeddings=4096, rms_norm_eps=1e-6, architectures=["Qwen3MoeForCausalLM"],
                          **SHAPE)


def active_flops_per_token(c) -> tuple[float, int]:
    h, q = c.hidden_size, c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * c.num_experts + c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
    active = c.num_hidden_layers * per_layer + c.vocab_size * h
    return 6 * active + 12 * c.num_hidden_layers * h * SEQ, active


def build(variant: str, cfg, seed: int):
    import torch

    from crosschip.weights.init import canonical_tensor

    if variant.startswith("transformers"):
        from transformers import Qwen3MoeForCausalLM

        cfg._attn_implementation = "sdpa"
        cfg._experts_implementation = variant.split("-", 1)[1]
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = Qwen3MoeForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(canonical_tensor(name, tuple(p.shape), seed, device="cuda", dtype=p.dtype))
        return model.train()
    from crosschip.checkpoint.loading import build_model
    from crosschip.modeling.compilation import compile_model
    from crosschip.models import model_class
    from crosschip.runtime import Runtime
    from crosschip.weights.init import init_weights

    runtime = Runtime("torch", device="cuda", dtype="bf16", strict=True)
    model = build_model(model_class("Qwen3MoeForCausalLM"), cfg, runtime)
    init_weights(model, seed=seed, device="cuda")
    compile_model(model, variant == "torch-compile")
    return model.train()


def worker(args) -> dict:
    import torch

    cfg = config()
    result = dict(variant=args.variant, batch=BATCH, seq=SEQ)
    try:
        model = build(args.variant, cfg, args.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device="cuda", generator=gen)
        times, losses = timed_steps(model, optimizer, ids, args.warmup, args.steps, result)
        median = statistics.median(times)
        per_token, active = active_flops_per_token(cfg)
        achieved = per_token * BATCH * SEQ / median / 1e12
        result.update(status="ok", step_s_median=median, step_s_all=times, tokens_per_s=BATCH * SEQ / median,
                      tflops=achieved, mfu_active_vs_peak=achieved / PEAK_TFLOPS, matmul_tflops=matmul_tflops(),
                      peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, active_params=active,
                      losses=losses)
    except Exception as exc:  # noqa: BLE001 - recorded (failure), the other variants still run
        result.update(failure(exc))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    runs = []
    report = {"command": "python " + " ".join(sys.argv), "versions": versions(), "shape": SHAPE,
              "batch": BATCH, "seq": SEQ, "peak_tflops": PEAK_TFLOPS, "runs": runs}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--seed", str(args.seed)]
        run = in_own_process(cmd, dict(variant=variant))
        runs.append(run)
        if run.get("status") == "ok":
            print(f"{variant:24s} {run['tokens_per_s']:10,.0f} tok/s  MFU (active) {run['mfu_active_vs_peak']:.1%}  "
                  f"peak {run['peak_memory_gib']:.1f} GiB", flush=True)
        else:
            print(f"{variant:24s} {run['status']}: {run.get('error', '')[:300]}", flush=True)
        best = max((r["tokens_per_s"] for r in runs if r.get("status") == "ok" and r["variant"].startswith("trans")),
                   default=None)
        for r in runs:
            if best and r.get("status") == "ok":
                r["speedup_vs_best_transformers"] = r["tokens_per_s"] / best
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
