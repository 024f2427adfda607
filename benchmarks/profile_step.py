"""Where a training step spends its GPU time: the top kernels of two profiled steps per variant
(same models and weights as train_step.py).

    python benchmarks/profile_step.py --shape 1b --seq 2048 --variants transformers torch te-bf16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    import torch

    from train_step import SHAPES, TOKENS_PER_STEP, VARIANTS, build, llama_config

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["transformers", "torch", "te-bf16"])
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    config = llama_config(args.shape, args.seq)
    batch = max(1, TOKENS_PER_STEP // args.seq)
    ids = torch.randint(0, config.vocab_size, (batch, args.seq), device="cuda")
    for variant in args.variants:
        model = build(variant, config, 0, "none")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
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
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        del model, optimizer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
