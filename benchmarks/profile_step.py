"""Where a training step spends its GPU time: the top kernels of two profiled steps per variant
(same models and weights as train_step.py).

    python benchmarks/profile_step.py --shape 1b --seq 2048 --variants transformers torch te-bf16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def gpu_busy(prof) -> tuple[float, float, int]:
    """(microseconds some kernel ran, microseconds from the first kernel's start to the last's
    end, kernel count): the gap between the two is time the GPU waited for work."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy, spans[-1][1] - spans[0][0], len(spans)


def main() -> int:
    import torch

    from train_step import SHAPES, TOKENS_PER_STEP, VARIANTS, build, llama_config

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["transformers", "torch", "te-bf16"])
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="step each parameter in the backward pass (crosschip.training.in_backward)")
    parser.add_argument("--trace-dir", default=None, help="also write a Chrome trace per variant here")
    args = parser.parse_args()
    config = llama_config(args.shape, args.seq)
    batch = max(1, TOKENS_PER_STEP // args.seq)
    ids = torch.randint(0, config.vocab_size, (batch, args.seq), device="cuda")
    for variant in args.variants:
        model = build(variant, config, 0, "none")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        if args.optimizer_in_backward:
            from crosschip.training.in_backward import step_in_backward

            step_in_backward(optimizer)
        # As train_step.py: the crosschip variants ask for no logits (a loss may fuse the LM head in).
        forward = {} if variant == "transformers" else dict(return_logits=False)

        def step(model=model, optimizer=optimizer, forward=forward):
            model(input_ids=ids, labels=ids, **forward).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        print(f"===== {variant} =====")
        busy, span, kernels = gpu_busy(prof)
        print(f"per step: GPU busy {busy / 2e3:.1f} ms of {span / 2e3:.1f} ms "
              f"(idle {(span - busy) / 2e3:.1f} ms, waiting on the host), {kernels // 2} kernels")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        if args.trace_dir:
            prof.export_chrome_trace(os.path.join(args.trace_dir, f"{variant}_seq{args.seq}.json"))
        del model, optimizer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
