"""A random-weights Hugging Face Llama checkpoint written straight to disk, one tensor at a time:
the safetensors headers are planned from the shapes alone, then each tensor is drawn
(``crosschip.weights.init.canonical_tensor``, so transformers and every crosschip backend load
the same values) and appended to its shard. At most one tensor is in memory, so an 8B checkpoint
(16 GB in bf16) is written on a machine with less memory than that, at disk speed.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import torch

#: safetensors' dtype names for the dtypes a benchmark writes.
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape of every weight crosschip (and transformers) save for ``config``,
    taken from crosschip's own bindings of a model built on the meta device (nothing allocated)."""
    from crosschip import weights
    from crosschip.models import model_class
    from crosschip.runtime import Runtime

    runtime = Runtime("reference", device="meta")
    with torch.device("meta"):
        model = model_class(config.architectures[0])(config, runtime)
    return {key: tuple(shape) for b in weights.bindings(model) for key, shape in b.hf_shapes.items()}


def _plan(shapes: dict[str, tuple[int, ...]], itemsize: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def _header(keys, shapes, dtype: torch.dtype) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        nbytes = itemsize * math.prod(shapes[key])
        entries[key] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[key]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_checkpoint(directory: str | Path, config, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     device: str = "cpu", log=print) -> int:
    """Write ``config.json`` and sharded safetensors with an index into ``directory``; returns the
    tensor bytes written. Values are drawn on ``device`` (CUDA is much faster for 8B)."""
    from crosschip.weights.init import canonical_tensor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan(shapes, itemsize)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, start = sum(itemsize * math.prod(s) for s in shapes.values()), time.perf_counter()
    written = 0
    for name, keys in zip(names, shards):
        partial = directory / (name + ".partial")
        with open(partial, "wb") as fh:
            fh.write(_header(keys, shapes, dtype))
            for key in keys:
                tensor = canonical_tensor(key, shapes[key], seed, device=device, dtype=dtype).cpu()
                fh.write(tensor.contiguous().view(torch.uint8).numpy().data)
                written += tensor.numel() * itemsize
                del tensor
            log(f"  {name}: {written / 2**30:.1f} of {total / 2**30:.1f} GiB "
                f"({time.perf_counter() - start:.0f} s)")
        partial.rename(directory / name)  # a file under its final name is complete
    if len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(directory)  # last: a directory with config.json is complete
    return total


def checkpoint_bytes(directory: str | Path) -> int:
    """Tensor bytes of the safetensors files in ``directory`` (what a load must move)."""
    total = 0
    for path in Path(directory).glob("*.safetensors"):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
        total += path.stat().st_size - 8 - length
    return total
