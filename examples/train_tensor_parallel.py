"""Train a Hugging Face checkpoint with tensor and data parallelism on the torch backend, then
save it consolidated (Hugging Face format, loadable anywhere).

    torchrun --nproc_per_node 2 examples/train_tensor_parallel.py --model path/to/llama --out out-tp
    torchrun --nproc_per_node 4 examples/train_tensor_parallel.py --model path/to/llama --out out --tp 2 --dp 2

Every rank loads only the rows and columns of each weight it holds; the loss, the gradients and
the saved checkpoint equal those of one process on the whole batch. `crosschip train --tp N
--dp M` does the same with the built-in corpus, progress bar and resumable training state.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import crosschip
from crosschip.parallel.distributed import DP_DIM, shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=None, help="default: every process one TP rank")
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch, split over dp")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    tp = args.tp or dist.get_world_size() // args.dp

    model = crosschip.from_pretrained(args.model, backend="torch", tp=tp, dp=args.dp,
                                      device="cuda" if cuda else "cpu").train()
    if dist.get_rank() == 0:
        print(model.runtime.report)
    dp_rank = model.runtime.device_mesh.get_local_rank(DP_DIM) if args.dp > 1 else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)  # the same global batch on every rank
    for step in range(args.steps):
        ids = torch.randint(0, model.opts.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        ids = ids.chunk(args.dp)[dp_rank].to(model.runtime.device)  # this data replica's part
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f} (data replica 0)")
    model.save_pretrained(args.out)  # gathered one component at a time; rank 0 writes
    del model, optimizer
    shutdown()


if __name__ == "__main__":
    main()
