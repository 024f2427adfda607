"""Reads a local Hugging Face checkpoint directory tensor by tensor (``safe_open``), so loading
never holds a second copy of the model, and names the file and key in every error. It reads only
files inside the directory: a shard or a ``model.safetensors`` that resolves (through ``..`` or a
symlink) anywhere else is refused, with one exception, the Hugging Face cache's own layout (see
:func:`_inside`)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES  # safetensors' own name -> dtype table

from crosschip.errors import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in its file (little-endian, row-major, as safetensors stores)."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsCheckpoint:
    """``keys()``, ``shape(key)``, ``get(key)`` over one file or an indexed set of shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        #: Tensor bytes returned so far (what a rank actually read, for load benchmarks).
        self.bytes_read = 0
        index = self.directory / INDEX
        single = self.directory / SINGLE
        if index.is_file():
            self.key_to_file = self._read_index(index)
        elif single.is_file():
            target = single.resolve()
            # A managed save's names are links into its own .crosschip/ (transaction.py): inside.
            if not _inside(self.directory, target):
                raise CheckpointError(f"{single}: a symlink to {target}, outside the checkpoint "
                                      "directory; refusing to read it")
            self.key_to_file = {k: single for k in self._open(single).keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            raise CheckpointError(
                f"{self.directory}: no {SINGLE} or {INDEX} found"
                + (f" (found {', '.join(found)})" if found else "")
            )

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid index (expected JSON with a 'weight_map' "
                                  f"object): {exc}") from exc
        bad = _malformed(weight_map)
        if bad:
            raise CheckpointError(f"{index}: not a valid index: 'weight_map' must map tensor names to "
                                  f"shard file names (strings), found {bad}")
        out = {}
        for key, name in weight_map.items():
            # A managed save's names are links into its own .crosschip/ (transaction.py).
            target = (self.directory / name).resolve()
            if Path(name).name != name or not _inside(self.directory, target):
                raise CheckpointError(f"{index}: key {key!r} points to {name!r}, outside the "
                                      "checkpoint directory; refusing to read it")
            if not target.is_file():
                raise CheckpointError(f"{index}: key {key!r} points to {name!r}, which does not exist")
            out[key] = target
        for shard in set(out.values()):
            listed = {k for k, f in out.items() if f == shard}
            actual = set(self._open(shard).keys())
            if not listed <= actual:
                missing = sorted(listed - actual)[:5]
                raise CheckpointError(f"{shard}: index {index.name} lists key(s) {missing} that "
                                      "the file does not hold")
        return out

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: not a readable safetensors file "
                                      f"(truncated or corrupt?): {exc}") from exc
            self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def describe(self, key: str) -> str:
        return str(self.key_to_file[key].name)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``, from the file header (no tensor data read)."""
        path = self.key_to_file[key]
        name = self._open(path).get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {name}, which torch cannot hold")
        return _SAFETENSORS_DTYPES[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.key_to_file[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        path = self.key_to_file[key]
        try:
            tensor = self._open(path).get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} (truncated or corrupt?): {exc}") from exc
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def get_slice(self, key: str, index: tuple) -> torch.Tensor:
        """Only ``index`` (a tuple of slices) of ``key``, read without the rest of the tensor."""
        path = self.key_to_file[key]
        try:
            tensor = self._open(path).get_slice(key)[index]
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read {key!r}{list(index)} (truncated or corrupt?): {exc}") from exc
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def locate(self, key: str) -> TensorLocation:
        """The file, byte range, dtype and shape of ``key``, from the file's header alone, for
        readers that copy the bytes themselves (:mod:`crosschip.checkpoint.staged_read`)."""
        path = self.key_to_file[key]
        start, header = self._header(path)
        entry = header.get(key)
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape, name = tuple(int(d) for d in entry["shape"]), entry["dtype"]
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: header entry of {key!r} is malformed "
                                  f"(expected dtype, shape and data_offsets): {entry!r}") from exc
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {name}, which torch cannot hold")
        dtype = _SAFETENSORS_DTYPES[name]
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        size = path.stat().st_size
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {key!r} ({name} {list(shape)}) needs {expected} bytes, "
                                  f"its header gives it {end - begin} (corrupt header?)")
        if start + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ({name} {list(shape)}) needs bytes {start + begin}.."
                                  f"{start + end}, found a file of {size} bytes (truncated?)")
        return TensorLocation(path, start + begin, expected, dtype, shape)

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data, parsed JSON header) of one safetensors file, read once."""
        cached = self._headers.get(path)
        if cached is None:
            try:
                with open(path, "rb") as fh:
                    (length,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(length))
            except (OSError, struct.error, ValueError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                      f"{exc}") from exc
            cached = self._headers[path] = (8 + length, header)
        return cached

    def release(self) -> None:
        """Drop the open files (and their memory maps); they reopen on the next read."""
        self._handles.clear()

    close = release


def _inside(directory: Path, target: Path) -> bool:
    """``target`` (resolved) is a file this checkpoint may read: inside ``directory``, or, for a
    snapshot of the Hugging Face cache (``models--org--name/snapshots/<revision>/``, whose files
    are links to ``../../blobs/<hash>``), in that same repository's ``blobs/`` and nowhere wider:
    not another repository's blobs, not a sub-directory of them."""
    root = directory.resolve()
    if root in target.parents:
        return True
    snapshots, repo = root.parent, root.parent.parent
    return (snapshots.name == "snapshots" and repo.name.startswith("models--")
            and target.parent == repo / "blobs")


def _malformed(weight_map) -> str:
    """What is wrong with an index's ``weight_map`` (empty when it maps str to str)."""
    if not isinstance(weight_map, dict):
        return f"a {type(weight_map).__name__}"
    for key, name in weight_map.items():
        if not isinstance(name, str):
            return f"{key!r} -> {name!r} ({type(name).__name__})"
    return ""
