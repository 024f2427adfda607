"""Writes canonical Hugging Face safetensors, sharded with an index, atomically: everything is
written into a temporary directory beside the target and swapped in only when complete, so a
failure at any point leaves the previous checkpoint at that path untouched."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from crosschip.checkpoint.reader import INDEX, SINGLE
from crosschip.errors import CheckpointError

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
    (config.json...) into ``directory``, atomically."""
    directory = Path(directory)
    shards = plan_shards(sizes, parse_size(max_shard_size))
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: {exc}") from exc
    try:
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
        write_extra(staging)
        _swap_into_place(staging, directory)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        from crosschip.errors import save_failure

        failure = save_failure(directory, exc)  # an OSError, or safetensors' wrapper of one
        if failure is not None:
            raise failure from exc
        raise
    return directory


def _swap_into_place(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(staging, directory)
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    # Keep what we do not own (tokenizer files, READMEs); old weights and configs are replaced.
    for item in directory.iterdir():
        if item.name.endswith(".safetensors") or (staging / item.name).exists() or item.name == INDEX:
            continue
        if item.is_file():
            shutil.copy2(item, staging / item.name)
    backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.rmdir(backup)
    os.rename(directory, backup)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(backup, directory)
        raise
    shutil.rmtree(backup, ignore_errors=True)
