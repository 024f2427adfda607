"""Writes canonical Hugging Face safetensors, sharded with an index. A save is atomic and
replaces only what it writes: the files go into a staging directory that ``transaction`` commits
in one step, so a failure at any point leaves the previous checkpoint at that path whole."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from crosschip.checkpoint.reader import INDEX, SINGLE
from crosschip.checkpoint.transaction import atomic_save

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB' or '500MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def write_checkpoint(
    directory: str | Path,
    sizes: list[tuple[str, int]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    write_extra: Callable[[Path], None],
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``tensors`` (streamed in the order of ``sizes``) and whatever ``write_extra`` adds
    (config.json...) into ``directory`` as one atomic save (see ``transaction``)."""
    with atomic_save(directory) as staging:
        write_weights(staging, sizes, tensors, max_shard_size)
        write_extra(staging)
    return Path(directory)


def write_weights(staging: Path, sizes: list[tuple[str, int]],
                  tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int | str = "5GB") -> None:
    """The safetensors file (or shards and index) of ``tensors`` into the fresh ``staging``."""
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    stream = iter(tensors)
    total = 0
    for name, keys in zip(names, shards):
        batch = {}
        for expected in keys:
            key, tensor = next(stream)
            if key != expected:
                raise RuntimeError(f"tensor stream out of order: got {key}, expected {expected}")
            batch[key] = tensor.detach().to("cpu").contiguous()
            total += batch[key].numel() * batch[key].element_size()
            weight_map[key] = name
        save_file(batch, str(staging / name), metadata={"format": "pt"})
        del batch
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
