"""Resuming reads a training state without running code from it: hostile pickles planted in
every file crosschip reads there (DCP ``.metadata``, each ``.distcp`` data file, ``meta.json``)
are refused with an error naming the file, and their payload never runs."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from crosschip.errors import CheckpointError
from crosschip.training.train import TrainArgs, train

ARGS = dict(steps=2, batch_size=2, seq_len=16, seed=1)


class _Hostile:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe-resume")
    train(TrainArgs(out=str(root / "ckpt"), stop_after=1, **ARGS), progress=False)
    return root / "ckpt"


def _copy(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the checkpoint, and its training state as crosschip reads it."""
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy, symlinks=True)
    return copy, (copy / "training_state").resolve()


def _resume(checkpoint: Path, tmp_path: Path, out: str = "never"):
    return train(TrainArgs(resume=str(checkpoint), out=str(tmp_path / out), **ARGS), progress=False)


def _payload(marker: Path) -> bytes:
    """What ``torch.save`` writes for a non-tensor item, here one that runs a command."""
    buffer = io.BytesIO()
    torch.save(_Hostile(marker), buffer)
    return buffer.getvalue()


def test_hostile_metadata_is_refused_naming_the_file(saved, tmp_path):
    checkpoint, state = _copy(saved, tmp_path)
    assert len(_resume(checkpoint, tmp_path, out="resumed").losses) == ARGS["steps"]  # the genuine one loads
    marker = tmp_path / "pwned"
    (state / ".metadata").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refers to posix\.system, which a training "
                                              r"state's metadata never holds"):
        _resume(checkpoint, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("items", ["non-tensor items", "every item"])
def test_hostile_data_file_items_are_refused_naming_the_file(saved, tmp_path, items):
    """Each data file gets the payload appended, and the (genuine) metadata pointed at it for the
    optimizer's param_groups, or for every item, tensors included."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    checkpoint, state = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    metadata = pickle.loads((state / ".metadata").read_bytes())  # our own save: trusted here
    kinds = metadata.state_dict_metadata
    data_files = sorted(state.glob("*.distcp"))
    assert data_files
    for data_file in data_files:
        offset = data_file.stat().st_size
        payload = _payload(marker)
        with open(data_file, "ab") as stream:
            stream.write(payload)
        for index, info in metadata.storage_data.items():
            hit = items == "every item" or isinstance(kinds[index.fqn], BytesStorageMetadata)
            if info.relative_path == data_file.name and hit:
                metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    (state / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: (item 'optim\.param_groups\.0\.\w+' is not "
                                              r"plain data|not a readable training state data file)"):
        _resume(checkpoint, tmp_path)
    assert not marker.exists()


def test_meta_json_that_is_not_json_is_refused_naming_the_file(saved, tmp_path):
    checkpoint, state = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    (state / "meta.json").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(CheckpointError, match=r"meta\.json: not valid JSON"):
        _resume(checkpoint, tmp_path)
    assert not marker.exists()

