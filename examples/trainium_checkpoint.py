"""Trainium (neuronx-distributed) shards from and back to a Hugging Face checkpoint.

    python examples/trainium_checkpoint.py --model path/to/llama --out out-nxd [--tp 4]

Shards ``--model`` at ``--tp`` in Optimum Neuron's layout (``out-nxd/shards/model/
dp_rank_00_tp_rank_0R_pp_rank_00.pt`` and ``mp_metadata_pp_rank_0.json``), loads the shards
directly with ``crosschip.from_pretrained`` on the reference backend, consolidates them back into
``out-nxd-hf`` and checks that every weight came back bit for bit and the logits are the
original's. ``crosschip convert SRC --out DST [--tp N]`` does each conversion from the shell; the
same shards come from Optimum Neuron's ``save_pretrained`` or NxD's ``trainer.save_checkpoint``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

import crosschip
from crosschip.checkpoint.convert import convert


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--out", required=True, help="where to write the shards (and OUT-hf, consolidated)")
    parser.add_argument("--tp", type=int, default=4)
    args = parser.parse_args(argv)

    shards, back = Path(args.out), Path(f"{args.out}-hf")
    print("\n".join(convert(args.model, shards, tp=args.tp).lines()))
    print("\n".join(convert(shards, back).lines()))

    original, consolidated = load_file(Path(args.model) / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == consolidated.keys()
    assert all(torch.equal(original[k], consolidated[k]) for k in original), "a weight changed"

    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        expected = crosschip.from_pretrained(args.model, backend="reference")(ids).logits
        from_shards = crosschip.from_pretrained(shards, backend="reference")(ids).logits
    assert torch.equal(expected, from_shards)
    print(f"{len(original)} weights back bit for bit; logits from the shards equal the original's")


if __name__ == "__main__":
    main()
