"""An NxD sharded checkpoint read as canonical Hugging Face tensors: the ``TensorSource`` the
loader takes (``keys``, ``shape``, ``dtype``, ``get``, ``get_slice``), so
``crosschip.from_pretrained`` loads Trainium shards on any backend at any tp, and the metadata
(the file beside the shards, or derived from the model config) that both it and
``crosschip convert`` consolidate by."""

from __future__ import annotations

from pathlib import Path

import torch

from crosschip.checkpoint.nxd import metadata as nxd_metadata
from crosschip.checkpoint.nxd.consolidate import Output, plan
from crosschip.checkpoint.nxd.files import METADATA_FILE, NxdCheckpoint
from crosschip.errors import CheckpointError


def stage_metadata(ckpt: NxdCheckpoint, config=None, kv_layout: str | None = None) -> dict:
    """Per pipeline stage: the metadata file's, or (without one) derived from ``config``."""
    metas = {}
    for pp in range(ckpt.pp):
        path = ckpt.metadata_path(pp)
        if path is not None:
            metas[pp] = nxd_metadata.read(path)
            continue
        if config is None:
            raise CheckpointError(
                f"{ckpt.tag_dir}: no {METADATA_FILE.format(pp=pp)} and no config.json beside the shards: name the model "
                "config (--config DIR) and, for replicated KV heads, the layout (--kv-layout tile|interleave)")
        state = ckpt.tensors(pp, 0)
        shapes = {k: tuple(state.get(k).shape) for k in state.keys()}
        metas[pp] = nxd_metadata.derive(config, shapes, ckpt.tp, kv_layout, str(ckpt.tag_dir))
    return metas


class ConsolidatedSource:
    """The canonical tensors of an NxD checkpoint, each assembled when asked for (the last one
    kept, for the slices a sharded load takes of it)."""

    def __init__(self, ckpt: NxdCheckpoint, config=None, kv_layout: str | None = None):
        self.ckpt = ckpt
        self.metadata = stage_metadata(ckpt, config, kv_layout)
        tied = bool(getattr(config, "tie_word_embeddings", False)) if config is not None else False
        self.outputs: dict[str, Output] = {o.name: o for o in plan(ckpt, self.metadata, tied_embeddings=tied)}
        self.bytes_read = 0
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return list(self.outputs)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.outputs[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.outputs[key].dtype

    def describe(self, key: str) -> str:
        return f"the NxD shards in {self.ckpt.tag_dir}"

    def get(self, key: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = None  # one weight at a time
            output = self.outputs[key]
            tensor = output.build()
            if tuple(tensor.shape) != output.shape or tensor.dtype != output.dtype:  # a planning bug, never silent
                raise CheckpointError(f"{key}: built {tuple(tensor.shape)} {tensor.dtype}, planned "
                                      f"{output.shape} {output.dtype}")
            self.bytes_read += output.nbytes
            self._last = (key, tensor)
        return self._last[1]

    def get_slice(self, key: str, index: tuple) -> torch.Tensor:
        return self.get(key)[index]

    def release(self) -> None:
        self._last = None
        self.ckpt.release()

    close = release


def open_source(path: str | Path, config=None, kv_layout: str | None = None) -> ConsolidatedSource:
    return ConsolidatedSource(NxdCheckpoint(path), config, kv_layout)
