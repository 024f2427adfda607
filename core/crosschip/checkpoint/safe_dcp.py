"""Reading a torch.distributed.checkpoint (DCP) training state without running code from it.

DCP's ``.metadata`` is a pickle and its non-tensor items (optimizer ``param_groups``) are
``torch.load``-ed with ``weights_only=False``: a crafted file would run arbitrary code on
resume. Here the metadata goes through an unpickler that resolves only the DCP metadata classes
(and the few torch/pathlib values they hold), every item is read with ``weights_only=True``, and
a refusal names the file. DCP itself still plans the load, so a state saved at one tp/dp layout
loads at another.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch

from crosschip.errors import CheckpointError

# What a DCP ``.metadata`` written by torch 2.x references, and nothing else. A class is called
# (NEWOBJ/REDUCE) only with the plain data its own pickle holds.
_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_METADATA, "Metadata"),
    (_METADATA, "MetadataIndex"),
    (_METADATA, "StorageMeta"),
    (_METADATA, "TensorStorageMetadata"),
    (_METADATA, "BytesStorageMetadata"),
    (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "TensorProperties"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes pickle as the global torch.<name>
        raise CheckpointError(f"{self.where}: refers to {module}.{name}, which a training state's "
                              "metadata never holds (expected only torch.distributed.checkpoint "
                              "metadata classes); refusing to load it")


def read_metadata_file(path: Path):
    """The DCP ``Metadata`` in ``path``, through the allow-list above."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or garbage: pickle raises many kinds
        raise CheckpointError(f"{path}: not a readable training state metadata file: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: expected torch.distributed.checkpoint Metadata, "
                              f"found {type(metadata).__name__}")
    return metadata


class _PlainDataPlanner:
    """Wraps a load planner so non-tensor items are unpickled with ``weights_only=True`` (plain
    containers and numbers only); the planner then gets bytes that we wrote from that data."""

    def __init__(self, planner, where: Path):
        self._planner, self._where = planner, where

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            data = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{self._where}: item {read_item.dest_index.fqn!r} is not plain data "
                                  f"(weights-only loading refused it: {exc})") from exc
        clean = io.BytesIO()
        torch.save(data, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.futures import Future

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file system reader with the allow-listed metadata and weights-only items, one
        data file at a time so an error names the file."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            metadata = read_metadata_file(Path(self._get_metadata_path(rank)))
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for relative_path, items in per_file.items():
                where = Path(self.path) / relative_path
                if Path(relative_path).name != relative_path:
                    raise CheckpointError(f"{Path(self.path) / '.metadata'}: names data file "
                                          f"{relative_path!r} outside the training state directory")
                try:
                    super().read_data(dataclasses.replace(plan, items=items),
                                      _PlainDataPlanner(planner, where))
                except CheckpointError:
                    raise
                except Exception as exc:  # weights-only refusals, truncation, size mismatches
                    raise CheckpointError(f"{where}: not a readable training state data file: "
                                          f"{type(exc).__name__}: {exc}") from exc
            done: Future = Future()
            done.set_result(None)
            return done

    return SafeFileSystemReader


def reader(directory: str | Path):
    """A DCP storage reader for ``directory`` that executes nothing from it."""
    return _reader_class()(str(directory))


def load(state: dict, directory: str | Path) -> None:
    """``torch.distributed.checkpoint.load(state)`` from ``directory``, safely (in place)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=reader(directory))
    except CheckpointException as exc:  # DCP gathers per-rank failures; surface ours
        for failure, _trace in exc.failures.values():
            if isinstance(failure, CheckpointError):
                raise CheckpointError(str(failure)) from None
        raise
