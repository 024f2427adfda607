"""The files of an NxD sharded checkpoint, and loading them without running code.

``neuronx_distributed.trainer.save_checkpoint(dir, tag, model=..., optimizer=...)`` writes::

    dir/<tag>/checkpoint, dir/<tag>/done        "1": a checkpoint directory; its save finished
    dir/<tag>/model/dp_rank_00_tp_rank_YY_pp_rank_ZZ.pt         one per tp and pp rank
    dir/<tag>/optim/dp_rank_00_tp_rank_YY_pp_rank_ZZ.pt
    dir/<tag>/mp_metadata_pp_rank_<pp>.json     (Optimum Neuron's, beside them)

In the xser format each ``.pt`` is a pickle of the state dict whose tensors are replaced by
``torch_xla.utils.serialization.TensorReference(tid)``; tensor ``tid`` is
``<file>.pt.tensors/tensor_<tid>.pt``. Optimum Neuron's ``save_pretrained`` uses the tag
``shards`` under the model directory, which holds ``config.json``.

Every file is a torch pickle. They are loaded only with ``torch.load(weights_only=True)``; the
xser reference class is the one global allowed beyond torch's own, and resolves to
:class:`TensorReference` here (torch_xla is never imported). A file that needs any other global
is refused with the name it asked for. Rank files are found by name in the checkpoint's own
``model/`` directory and must resolve inside it; nothing read from a file names a path.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from crosschip.errors import CheckpointError

XSER_REFERENCE = "torch_xla.utils.serialization.TensorReference"
OPTIMUM_TAG = "shards"
RANK_FILE = re.compile(r"dp_rank_(\d{2})_tp_rank_(\d{2})_pp_rank_(\d{2})\.pt")
METADATA_FILE = "mp_metadata_pp_rank_{pp}.json"


class TensorReference:
    """What xser's ``TensorReference(tid)`` unpickles to: the number of a tensor file."""

    def __init__(self, tid: int):
        self.tid = tid


def safe_load(path: Path, what: str, xser_references: bool = False):
    """``torch.load(path, weights_only=True)`` memory-mapped where the file allows it, with xser's
    reference class as the only extra global when ``xser_references``. Errors name the file."""
    allowed = [(TensorReference, XSER_REFERENCE)] if xser_references else []
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # a legacy (non-zip) torch.save file cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        needs = f"the global {found.group(1).replace(' ', '.')}" if found else "something weights_only forbids"
        raise CheckpointError(
            f"{path}: {what} needs {needs}, which is not a tensor or plain data; refusing to load it "
            "(it could run code). crosschip reads NxD files with torch.load(weights_only=True), allowing "
            f"only {XSER_REFERENCE} in xser files") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read {what} (truncated or corrupt?): {exc}") from None


@dataclass(frozen=True)
class RankFiles:
    """The model files of one save: ``files[(pp, tp)]``."""

    files: dict
    tp: int
    pp: int
    xser: bool


class NxdCheckpoint:
    """One tag of an NxD checkpoint: its rank files, metadata files and the directory holding
    the model config (if any). ``tensors(pp, tp)`` loads one rank's model state lazily."""

    def __init__(self, path: str | Path):
        self.tag_dir = locate(Path(path))
        self.model_dir = self.tag_dir / "model"
        if not (self.tag_dir / "done").is_file():
            raise CheckpointError(
                f"{self.tag_dir}: no 'done' marker: neuronx-distributed writes it when every rank has "
                "finished saving, so this save did not finish (or is still running); refusing to read "
                "a partial checkpoint")
        ranks = rank_files(self.model_dir)
        self.files, self.tp, self.pp, self.xser = ranks.files, ranks.tp, ranks.pp, ranks.xser
        #: The directory with config.json (Optimum Neuron's layout: the parent of the tag), or None.
        parent = self.tag_dir.parent
        self.config_dir = parent if (parent / "config.json").is_file() else None
        self._cache: dict = {}

    @property
    def format(self) -> str:
        return "xser" if self.xser else "plain"

    def metadata_path(self, pp: int) -> Path | None:
        path = self.tag_dir / METADATA_FILE.format(pp=pp)
        if not path.exists():
            return None
        if not _inside(self.tag_dir, path.resolve()):
            raise CheckpointError(f"{path}: a link to {path.resolve()}, outside the checkpoint; refusing to read it")
        return path

    def tensors(self, pp: int, tp: int) -> "RankState":
        key = (pp, tp)
        if key not in self._cache:  # plain files are memory-mapped, xser tensors read on demand
            self._cache[key] = RankState(self.files[key], self.xser, self.model_dir)
        return self._cache[key]

    def release(self) -> None:
        self._cache.clear()


def is_nxd_checkpoint(path: str | Path) -> bool:
    try:
        locate(Path(path))
    except CheckpointError:
        return False
    return True


def locate(path: Path) -> Path:
    """The tag directory for ``path``: the tag itself (it has ``model/``), a model directory with
    Optimum Neuron's ``shards/``, or a checkpoint directory of tags, of which the newest completed
    one is taken, as NxD's ``load_checkpoint`` does (the latest ``done`` marker)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / "model").is_dir():
        return path
    if (path / OPTIMUM_TAG / "model").is_dir():
        return path / OPTIMUM_TAG
    tags = [p for p in path.iterdir() if p.is_dir() and (p / "model").is_dir() and (p / "checkpoint").is_file()]
    done = [p for p in tags if (p / "done").is_file()]
    if done:
        return max(done, key=lambda p: ((p / "done").stat().st_mtime_ns, p.name))
    if tags:
        raise CheckpointError(f"{path}: holds the checkpoint tag(s) {', '.join(sorted(p.name for p in tags))}, none of "
                              "them finished (no 'done' marker)")
    raise CheckpointError(
        f"{path}: not a neuronx-distributed checkpoint: expected a tag directory with model/, a model directory "
        f"with {OPTIMUM_TAG}/model/, or a directory of tags (each with model/ and a 'checkpoint' marker)")


def rank_files(model_dir: Path) -> RankFiles:
    """Every ``dp_rank_00_tp_rank_YY_pp_rank_ZZ.pt`` in ``model_dir``, checked for a full set."""
    found, other = {}, []
    for entry in sorted(model_dir.iterdir()):
        if entry.name.endswith((".tensors", ".info.pt")):
            continue
        match = RANK_FILE.fullmatch(entry.name)
        if match is None:
            other.append(entry.name)
            continue
        dp, tp, pp = (int(g) for g in match.groups())
        if dp != 0:  # NxD writes the model once, from data-parallel rank 0
            raise CheckpointError(f"{entry}: a model file of data-parallel rank {dp}; NxD writes the model from "
                                  "dp rank 0 only, so this is not one of its checkpoints")
        if not _inside(model_dir, entry.resolve()) or not entry.resolve().is_file():
            raise CheckpointError(f"{entry}: not a regular file inside {model_dir}; refusing to read it")
        found[(pp, tp)] = entry
    if not found:
        extra = f" (found {', '.join(other[:5])})" if other else ""
        raise CheckpointError(f"{model_dir}: no rank files dp_rank_00_tp_rank_YY_pp_rank_ZZ.pt{extra}")
    tp = max(t for _, t in found) + 1
    pp = max(p for p, _ in found) + 1
    missing = [f"dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt" for p in range(pp) for t in range(tp)
               if (p, t) not in found]
    if missing:
        raise CheckpointError(f"{model_dir}: rank file(s) {', '.join(missing)} missing: the rank files present "
                              f"imply tp={tp}, pp={pp}, and every one must be there")
    xser = [(Path(f"{p}.tensors")).is_dir() for p in found.values()]
    if any(xser) and not all(xser):
        plain = sorted(p.name for p, x in zip(found.values(), xser) if not x)
        raise CheckpointError(f"{model_dir}: some rank files are xser (with a .tensors folder) and some are not "
                              f"({', '.join(plain)}): not one save")
    return RankFiles(found, tp, pp, all(xser))


class RankState:
    """One rank's model state: ``keys()``, ``get(key)`` (a memory-mapped tensor)."""

    def __init__(self, path: Path, xser: bool, model_dir: Path):
        self.path, self.xser, self.model_dir = path, xser, model_dir
        state = safe_load(path, "a model state file", xser_references=xser)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor), found "
                                  f"{type(state).__name__}")
        wanted = TensorReference if xser else torch.Tensor
        for key, value in state.items():
            if not isinstance(value, wanted) or (xser and not _valid_tid(value)):
                raise CheckpointError(f"{path}: key {key!r} holds {_describe(value)}, expected "
                                      f"{'an xser tensor reference' if xser else 'a tensor'}")
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._state:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in this rank's model state")
        if not self.xser:
            return self._state[key]
        # Read on each call and not kept: a weight is held only while it is being assembled.
        return read_reference(self._state[key], self.path, self.model_dir)


def read_reference(ref: TensorReference, path: Path, root: Path) -> torch.Tensor:
    """The tensor an xser reference in ``path`` names: ``<path>.tensors/tensor_<tid>.pt``, which
    must be a regular file inside ``root``, loaded with weights_only."""
    tid = getattr(ref, "tid", None)
    file = Path(f"{path}.tensors") / f"tensor_{tid}.pt"
    if not _valid_tid(ref) or not file.is_file() or not _inside(root, file.resolve()):
        raise CheckpointError(f"{path}: refers to tensor {tid!r}, but {file} is missing or not a regular file inside "
                              "the checkpoint")
    tensor = safe_load(file, f"tensor {tid} of {path.name}")
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{file}: expected one tensor, found {_describe(tensor)}")
    return tensor


def _valid_tid(ref: TensorReference) -> bool:
    tid = getattr(ref, "tid", None)
    return type(tid) is int and tid >= 0 and set(vars(ref)) == {"tid"}


def _describe(value) -> str:
    return f"a {type(value).__name__}" + (f" {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")


def _inside(directory: Path, target: Path) -> bool:
    return directory.resolve() in target.parents
