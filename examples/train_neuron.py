"""Fine-tune a Hugging Face checkpoint on the neuron backend (neuronx-distributed) with tensor
parallelism, then save it consolidated (Hugging Face format, loadable on any backend).

On a Trainium host, one process per NeuronCore, bf16 on the XLA device:

    torchrun --nproc_per_node 2 examples/train_neuron.py --model path/to/llama --out out-trn --device xla --dtype bfloat16

On any CPU machine, in neuronx-distributed's CPU mode (gloo), to try the same code:

    NXD_CPU_MODE=1 torchrun --nproc_per_node 2 examples/train_neuron.py --model path/to/llama --out out-cpu

The backend joins torchrun's process group and initialises NxD's model parallelism itself.
`runtime.step_boundary()` after each step runs XLA's ``mark_step`` on Trainium (nothing in CPU
mode). `crosschip train --backend neuron --tp N` does the same with the built-in corpus.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import crosschip
from crosschip.parallel.distributed import shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", help="xla on Trainium; cpu in NxD's CPU mode")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    import os

    tp = int(os.environ.get("WORLD_SIZE", 1))  # every process one TP rank
    model = crosschip.from_pretrained(args.model, backend="neuron", tp=tp, device=args.device, dtype=args.dtype,
                                      sequence_parallel=args.sequence_parallel, strict=True).train()
    rank = dist.get_rank()
    if rank == 0:
        print(model.runtime.report)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)  # the same batch on every rank
    for step in range(args.steps):
        ids = torch.randint(0, model.opts.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        ids = ids.to(model.runtime.device)
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.runtime.step_boundary()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    model.save_pretrained(args.out)  # gathered one component at a time; rank 0 writes
    del model, optimizer
    shutdown()


if __name__ == "__main__":
    main()
