"""AdamW's step alone over a Llama shape's parameters on one GPU: how close each implementation
comes to the GPU's memory bandwidth, which bounds it (every element's weight, gradient and two
moments are read and three written each step).

    python benchmarks/optimizer_step.py --shape 1b --out benchmarks/results/optimizer_step_1b.json

Variants: torch's fused AdamW over every parameter at once (``fused``, what the training benchmark
and ``crosschip train`` use), the same in buckets of ``--bucket-numel`` elements as the optimizer in
backward steps (``fused-buckets``), one compiled kernel per parameter (``compiled-each``, AdamW's
update written out and compiled once per shape), torchao's bf16 AdamW (``torchao``, the same idea;
its moments follow the weights' dtype) and Transformer Engine's FusedAdam (``te``, its default fp32
moments, so more bytes). ``copy`` is a device-to-device copy of the same bytes, the bandwidth
reachable. Weights and gradients are bf16; torch's moments follow the weights' dtype.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

from train_step import SHAPES, llama_config

VARIANTS = ["copy", "fused", "fused-buckets", "compiled-each", "torchao", "te"]


def parameters(shape: str):
    """bf16 CUDA parameters with the shapes of ``shape``'s transformers model, and bf16 gradients."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config(shape, 2048))
    params = []
    for p in meta.parameters():
        param = torch.nn.Parameter(torch.randn(p.shape, device="cuda", dtype=torch.bfloat16) * 0.02)
        param.grad = torch.randn_like(param) * 1e-3
        params.append(param)
    return params


def timed(fn, warmup: int, steps: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_function(variant: str, params, bucket_numel: int):
    """(step, bytes moved per step) of ``variant`` over ``params``."""
    import torch

    numel = sum(p.numel() for p in params)
    bf16_bytes = 7 * 2 * numel  # weight r/w, gradient r, two moments r/w
    if variant == "copy":
        src = torch.empty(bf16_bytes // 4, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), bf16_bytes
    if variant == "fused-buckets":
        buckets, size = [[]], 0
        for p in params:
            buckets[-1].append(p)
            size += p.numel()
            if size >= bucket_numel:
                buckets, size = buckets + [[]], 0
        optimizers = [torch.optim.AdamW(b, lr=1e-5, fused=True) for b in buckets if b]
        return (lambda: [o.step() for o in optimizers]), bf16_bytes
    if variant == "compiled-each":
        update = torch.compile(_adamw_update, fullgraph=True, dynamic=False)
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        step = torch.zeros((), device="cuda")

        def each():
            step.add_(1)
            for p, (m, v) in zip(params, moments):
                update(p.detach(), p.grad, m, v, step, 1e-5, 0.9, 0.999, 0.01, 1e-8)

        return each, bf16_bytes
    if variant == "torchao":
        from torchao.optim import _AdamW

        return _AdamW(params, lr=torch.tensor(1e-5)).step, bf16_bytes
    if variant == "te":
        from transformer_engine.pytorch.optimizers import FusedAdam

        # fp32 moments (its default): 4 more bytes per moment and element, read and written
        return FusedAdam(params, lr=1e-5).step, bf16_bytes + 2 * 2 * 2 * numel
    return torch.optim.AdamW(params, lr=1e-5, fused=True).step, bf16_bytes


def _adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr: float, beta1: float, beta2: float, weight_decay: float,
                  eps: float) -> None:
    """torch's AdamW update of one parameter, in fp32, its results stored in the tensors' dtypes."""
    import torch

    p32, g32 = p.float() * (1 - lr * weight_decay), grad.float()
    m32 = exp_avg.float().lerp(g32, 1 - beta1)
    v32 = exp_avg_sq.float() * beta2 + (1 - beta2) * g32 * g32
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)
    denom = v32.sqrt() / torch.sqrt(1 - beta2**step) + eps
    p.copy_(p32 - lr / (1 - beta1**step) * m32 / denom)


def main() -> None:
    import torch

    from crosschip.training.in_backward import BUCKET_NUMEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--bucket-numel", type=int, default=BUCKET_NUMEL)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    params = parameters(args.shape)
    result = {"command": "python benchmarks/optimizer_step.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "parameters": sum(p.numel() for p in params), "tensors": len(params), "runs": []}
    for variant in args.variants:
        try:
            step, moved = step_function(variant, params, args.bucket_numel)
            ms = timed(step, args.warmup, args.steps)
            run = {"variant": variant, "ms": round(ms, 3), "gb_moved": round(moved / 1e9, 2),
                   "tb_per_s": round(moved / ms / 1e9, 2)}
        except Exception as error:  # noqa: BLE001 - one variant's failure is its row, not the run's end
            run = {"variant": variant, "status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
        print(json.dumps(run), flush=True)
        result["runs"].append(run)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
