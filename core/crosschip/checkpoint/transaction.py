"""One save into a checkpoint directory as one atomic step, under an exclusive lock.

Layout of a directory crosschip saves into (everything else in it is never touched)::

    out/config.json -> .crosschip/current/config.json        (one link per file a save writes)
    out/training_state -> .crosschip/current/training_state
    out/.crosschip/lock                 flock'ed for the whole save (and a whole training run)
    out/.crosschip/current -> save-ID   the commit pointer
    out/.crosschip/save-ID/             a complete save: its files and manifest.json

A save writes everything into a fresh ``save-ID/`` (every rank of a parallel save writes there),
fsyncs it, writes its manifest, creates the top-level links it needs (through ``current``, so
they change nothing yet), then commits with ONE ``os.replace`` of ``current``. Before that the
directory is the previous save, after it the new one; a kill at any point leaves one of the two.
The previous ``save-ID/`` and links that only it needed are removed after the commit, and any
leftover of a killed save (uncommitted ``save-*``, temporary links) by the next save. Plain
transformers reads the top-level names; crosschip readers resolve ``current`` once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from crosschip.checkpoint.lock import CONTROL, LOCK, output_lock
from crosschip.parallel.distributed import rank as distributed_rank
from crosschip.errors import CheckpointError, save_failure

logger = logging.getLogger(__name__)

CURRENT = "current"
MANIFEST = "manifest.json"
FORMAT = "crosschip-save/1"
_LINK_PREFIX = f"{CONTROL}/{CURRENT}/"
_TMP_LINK = ".crosschip-tmp-"  # a top-level link being put in place
# Real files (or dirs) a pre-manifest save left under the names a save writes are adopted as the
# previous save first, so replacing them is the same one-step commit.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def committed_directory(directory: str | Path) -> Path:
    """Where the committed save of ``directory`` lives, resolved once: its ``save-ID/`` for a
    directory this module manages, ``directory`` itself otherwise (a plain HF checkpoint)."""
    directory = Path(directory)
    current = directory / CONTROL / CURRENT
    if current.is_symlink():
        name = os.readlink(current)
        if Path(name).name != name or not name.startswith("save-"):
            raise CheckpointError(f"{current}: points to {name!r}; expected a save-ID directory beside it")
        target = directory / CONTROL / name
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{current}: points to {target.name}, which holds no {MANIFEST}")
        return target
    return directory


def manifest(directory: str | Path) -> dict | None:
    """The committed save's manifest (``save_id``, ``entries``), or None for a plain directory."""
    committed = committed_directory(directory)
    if committed == Path(directory):
        return None
    path = committed / MANIFEST
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"expected format {FORMAT!r} with an 'entries' list")
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a crosschip save manifest: {exc}") from exc
    return data


def holds_checkpoint(directory: Path) -> bool:
    return (directory / CONTROL / CURRENT).is_symlink() or any(
        (directory / name).exists() for name in ("config.json", *_WEIGHTS, "training_state"))


# -- one save ------------------------------------------------------------------------------
class Save:
    """``begin()`` -> a fresh staging directory; then ``commit()`` or ``abort()``. The caller
    holds :func:`output_lock` around all three."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.control = self.directory / CONTROL
        self.save_id = uuid.uuid4().hex[:16]
        self.staging = self.control / f"save-{self.save_id}"

    def begin(self) -> Path:
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} exists and is not a directory")
        clean_leftovers(self.directory)
        self.staging.mkdir()
        return self.staging

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self) -> None:
        entries = sorted(p.name for p in self.staging.iterdir() if p.name != MANIFEST)
        _fsync_tree(self.staging)
        _write_json(self.staging / MANIFEST, {"format": FORMAT, "save_id": self.save_id, "entries": entries})
        _adopt_unmanaged(self.directory, entries)
        for name in entries:
            _link_through_current(self.directory, name)
        _fsync_dir(self.directory)
        current = self.control / CURRENT
        previous = self.control / os.readlink(current) if current.is_symlink() else None
        _replace_link(self.control / CURRENT, self.staging.name)  # THE commit
        _fsync_dir(self.control)
        if previous is not None and previous != self.staging:
            shutil.rmtree(previous, ignore_errors=True)
        _unlink_unlisted(self.directory, set(entries))


def clean_leftovers(directory: Path) -> None:
    """Remove what killed saves left: uncommitted ``save-*``, temporary links, and top-level
    links of ours that the committed save does not list. Logged, never silent."""
    # Beside the directory: what the writer before this one left when killed. An ".old-" one
    # may be the only copy of a checkpoint, so it is reported, never removed.
    for item in [*directory.parent.glob(f".{directory.name}.tmp-*"),
                 *directory.parent.glob(f".{directory.name}.old-*")]:
        logger.warning("%s: left by an interrupted save of an earlier crosschip; check it and remove it",
                       item)
    control = directory / CONTROL
    if not control.is_dir():
        return
    current = control / CURRENT
    keep = os.readlink(current) if current.is_symlink() else None
    for item in control.iterdir():
        if item.name in (CURRENT, LOCK) or item.name == keep:
            continue
        if item.name.startswith(("save-", "tmp-")):
            logger.warning("%s: removing %s, left by a save that did not finish", directory, item.name)
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
    if keep is not None:  # a kill while _adopt_edited replaced a file of the committed save
        for item in (control / keep).glob("tmp-*"):
            item.unlink()
    listed = set(manifest(directory)["entries"]) if keep is not None else set()
    _unlink_unlisted(directory, listed)


def _unlink_unlisted(directory: Path, listed: set[str]) -> None:
    """Top-level links of ours (into ``.crosschip/current/``) that the committed save does not
    list: names only the previous save wrote, or links a killed save made."""
    for item in directory.iterdir():
        if not item.is_symlink():
            continue
        target = os.readlink(item)
        if item.name.startswith(_TMP_LINK) or (item.name not in listed and target.startswith(_LINK_PREFIX)):
            item.unlink()


def _link_through_current(directory: Path, name: str) -> None:
    target = _LINK_PREFIX + name
    path = directory / name
    if path.is_symlink() and os.readlink(path) == target:
        return
    if path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: expected a link to {target} after adopting it")  # adopted above
    _replace_link(path, target)


def _replace_link(path: Path, target: str) -> None:
    """Point ``path`` at ``target`` atomically: a new link under a temporary name beside it,
    renamed over (``clean_leftovers`` knows the temporary names)."""
    temporary = path.parent / f"{_TMP_LINK if path.parent.name != CONTROL else 'tmp-'}{uuid.uuid4().hex[:12]}"
    os.symlink(target, temporary)
    os.replace(temporary, path)


def _adopt_unmanaged(directory: Path, entries: list[str]) -> None:
    """Before the first managed save replaces files a plain save left (real files under names it
    writes, and the previous weights: ``model.safetensors``, the index and the shards it lists),
    make them a committed save of their own by hard links, then turn each into a link to the
    same content; every step keeps the previous checkpoint whole."""
    control = directory / CONTROL
    if (control / CURRENT).is_symlink():
        _adopt_edited(directory, entries)
        return
    names = set(entries) | set(_WEIGHTS)
    index = directory / _WEIGHTS[1]
    if index.is_file() and not index.is_symlink():
        try:
            names |= set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError, TypeError):
            pass  # not ours to judge here: the new save replaces it
    adopt = sorted(n for n in names if "/" not in str(n) and (directory / n).exists()
                   and not (directory / n).is_symlink())
    if not adopt:
        return
    previous = control / f"save-{uuid.uuid4().hex[:16]}"
    previous.mkdir()
    for name in adopt:
        source = directory / name
        if source.is_dir():
            shutil.copytree(source, previous / name, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, previous / name)
    _fsync_tree(previous)
    _write_json(previous / MANIFEST, {"format": FORMAT, "save_id": previous.name[5:], "entries": adopt,
                                      "adopted": True})  # its parts carry no save id
    _replace_link(control / CURRENT, previous.name)
    for name in adopt:
        source = directory / name
        if source.is_dir():  # a directory cannot be replaced by a link in one rename
            trash = control / f"tmp-{uuid.uuid4().hex[:12]}"
            os.rename(source, trash)
            _replace_link(source, _LINK_PREFIX + name)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            _replace_link(source, _LINK_PREFIX + name)


def _adopt_edited(directory: Path, entries: list[str]) -> None:
    """A real file where a managed save keeps a link (an editor replaced the link with the
    edited file): it is what readers see, so it takes the committed save's copy's place
    before the link is put back."""
    committed = committed_directory(directory)
    for name in entries:
        source = directory / name
        if source.is_symlink() or not source.exists():
            continue
        if source.is_dir():
            raise CheckpointError(f"{source}: a directory where this save keeps a link to "
                                  f"{_LINK_PREFIX}{name}; move it away to save here")
        temporary = committed / f"tmp-{uuid.uuid4().hex[:12]}"
        _link_or_copy(source, temporary)
        os.replace(temporary, committed / name)
        _replace_link(source, _LINK_PREFIX + name)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as stream:
        stream.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_tree(root: Path) -> None:
    """Data on disk before the commit points at it (a power cut must not commit empty files)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a save by one process or by every rank of a process group -----------------------------
@contextlib.contextmanager
def atomic_save(directory: str | Path, distributed: bool = False):
    """Yield the staging directory a save writes into; commit when the body succeeded (on every
    rank, when ``distributed``), else remove it, leaving the previous save whole. Under a
    process group rank 0 locks, stages and commits; every rank writes its own files there."""
    directory = Path(directory)
    rank = distributed_rank() if distributed else 0
    save, lock, failure, local = None, contextlib.ExitStack(), None, None
    if rank == 0:
        try:
            lock.enter_context(output_lock(directory))
            save = Save(directory)
            save.begin()
        except Exception as exc:  # reported to every rank below, so none waits forever
            lock.close()
            failure = _describe(exc, directory)
    staging, failure = _from_rank0([save.staging if save else None, failure], distributed)
    if failure is not None:
        raise CheckpointError(failure)
    try:
        try:
            yield Path(staging)
        except Exception as exc:
            failure, local = _describe(exc, directory), exc
        except BaseException:  # Ctrl-C: no collectives, just leave the previous save in place
            if save is not None:
                save.abort()
            raise
        failures = _gather(failure, distributed)
        if rank == 0:
            if any(failures):
                save.abort()
            else:
                try:
                    save.commit()
                except Exception as exc:
                    save.abort()
                    failures = [_describe(exc, directory)]
        (outcome,) = _from_rank0([next((f for f in failures if f), None)], distributed)
        if outcome is not None:
            raise CheckpointError(outcome) from local
    finally:
        lock.close()


def _describe(exc: Exception, directory: Path) -> str:
    if isinstance(exc, CheckpointError):
        return str(exc)
    failure = save_failure(directory, exc)  # an OSError, or safetensors' wrapper of one (a full disk)
    if failure is not None:
        return str(failure)
    return f"saving {directory} failed: {type(exc).__name__}: {exc}"


def _from_rank0(values: list, distributed: bool) -> list:
    if distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(values, src=0)
    return values


def _gather(value, distributed: bool) -> list:
    if not distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
