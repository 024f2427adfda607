"""Train a Hugging Face checkpoint with tensor parallelism on the torch backend, then save it
consolidated (Hugging Face format, loadable anywhere).

    torchrun --nproc_per_node 2 examples/train_tensor_parallel.py --model path/to/llama --out out-tp

Every rank loads only the rows and columns of each weight it holds; the loss, the gradients and
the saved checkpoint equal those of one process. `crosschip train --tp N` does the same with the
built-in corpus, progress bar and resumable training state.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import crosschip
from crosschip.distributed import shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    tp = dist.get_world_size()

    model = crosschip.from_pretrained(args.model, backend="torch", tp=tp,
                                      device="cuda" if cuda else "cpu").train()
    if dist.get_rank() == 0:
        print(model.runtime.report)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)  # the same batch on every rank of the TP group
    for step in range(args.steps):
        ids = torch.randint(0, model.opts.vocab_size, (4, args.seq_len), generator=generator)
        ids = ids.to(model.runtime.device)
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    model.save_pretrained(args.out)  # gathered one component at a time; rank 0 writes
    shutdown()


if __name__ == "__main__":
    main()
