"""Fine-tune a LoRA adapter on any backend, save it in Hugging Face PEFT's format, and merge it.

    python examples/lora_finetune.py --model path/to/llama --out out-lora [--backend torch] [--dora]

Only the adapter trains (the base is frozen: no gradients, no optimizer state). The saved
``out-lora/adapter`` loads with ``peft.PeftModel.from_pretrained`` on the transformers model, or
with ``crosschip.from_pretrained(base, adapter=...)`` on any backend; ``out-lora/merged`` is a
plain Hugging Face checkpoint with the adapter folded in. ``crosschip train --lora r=16,alpha=32``
does the same with the built-in data pipeline, saves and resume.
"""

from __future__ import annotations

import argparse

import torch

import crosschip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory or Hub id")
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    lora = crosschip.LoraConfig(r=16, alpha=32, use_dora=args.dora)  # q, k, v, o, gate, up, down
    model = crosschip.from_pretrained(args.model, backend=args.backend, lora=lora).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, args.seq_len), device=model.runtime.device)
    for step in range(args.steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.save_adapter(f"{args.out}/adapter", base_model=args.model)
    model.merge_adapter()
    model.save_pretrained(f"{args.out}/merged")
    print(f"adapter in {args.out}/adapter, merged model in {args.out}/merged")


if __name__ == "__main__":
    main()
