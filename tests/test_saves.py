"""Saving: a save replaces only what it writes; weights, tokenizer and training state commit as
one unit, whatever point a SIGKILL hits; two writers never share an output; a run never replaces
a checkpoint it did not start from unless told to."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crosschip
from crosschip.checkpoint import SafetensorsCheckpoint
from crosschip.errors import CheckpointError, ConfigurationError
from crosschip.training.train import TrainArgs, train
from helpers import save_hf_llama
from save_kill import run_child, wait

ARGS = dict(steps=2, batch_size=2, seq_len=16, seed=2)


def _foreign(directory: Path) -> None:
    """What a user keeps beside a checkpoint: none of it is the save's to touch."""
    (directory / ".git").mkdir(parents=True)
    (directory / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (directory / "original").mkdir()
    (directory / "original" / "model.safetensors").write_bytes(b"original weights")
    (directory / "logs").mkdir()
    (directory / "logs" / "run.txt").write_text("step 1\n")
    (directory / "adapter_model.safetensors").write_bytes(b"an adapter")
    (directory / "README.md").write_text("# my model\n")
    (directory / "latest-log").symlink_to("logs/run.txt")
    directory.chmod(0o750)


_PLAIN_SAVE = ("config.json", "generation_config.json", "model.safetensors")


def _snapshot(directory: Path) -> dict:
    """Everything in ``directory`` but the save's own (.crosschip/ and its links) and a plain
    checkpoint's files, with the directory's mode."""
    found = {".": stat.S_IMODE(directory.stat().st_mode)}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        ours = path.is_symlink() and os.readlink(path).startswith(".crosschip/")
        if name.split("/")[0] == ".crosschip" or ours or (name in _PLAIN_SAVE and not path.is_symlink()):
            continue
        found[name] = ("link", os.readlink(path)) if path.is_symlink() else (
            "dir" if path.is_dir() else path.read_bytes())
    return found


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(directory)
    return {key: checkpoint.get(key) for key in checkpoint.keys()}


@pytest.mark.parametrize("start", ["empty", "a plain Hugging Face checkpoint"])
def test_save_keeps_everything_it_does_not_own(tmp_path, start):
    save_hf_llama(tmp_path / "in")
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch")
    target = tmp_path / "target"
    target.mkdir()
    _foreign(target)
    before = _snapshot(target)
    if start != "empty":  # its files are the previous save's: replaced, not kept
        save_hf_llama(target, seed=1)
        assert all((target / name).is_file() for name in _PLAIN_SAVE) and _snapshot(target) == before
    model.save_pretrained(target, max_shard_size="40KB")  # sharded
    assert _snapshot(target) == before
    edited = (target / "config.json").read_text()
    (target / "config.json").unlink()  # as `sed -i` does: the link becomes a real, edited file
    (target / "config.json").write_text(edited)
    model.save_pretrained(target)  # one file: its own stale shards go, nothing else
    assert _snapshot(target) == before
    assert not [p.name for p in target.iterdir() if p.name.startswith("model-")]
    assert (target / "adapter_model.safetensors").read_bytes() == b"an adapter"
    for key, tensor in _weights(target).items():
        assert torch.equal(tensor, model.hf_state_dict()[key]), key


def _train_once(out: Path, **extra):
    return train(TrainArgs(out=str(out), **{**ARGS, **extra}), progress=False)


def _step(directory: Path) -> int:
    return json.loads((directory / "training_state" / "meta.json").read_text())["step"]


def test_sigkill_at_every_write_of_a_training_save_leaves_old_or_new(tmp_path):
    """A resumed run saves step 2 over the step-1 save it started from; it is killed just
    before each file-system write of that save in turn (renames and link swaps included),
    each time from the same step-1 directory. After every kill the directory is, as a whole,
    the step-1 save or the step-2 save, and what a kill left is cleaned up by the next save."""
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    work = tmp_path / "w"
    out = work / "out"
    _train_once(out, stop_after=1)
    old = _weights(out)
    pristine, reference = tmp_path / "pristine", tmp_path / "reference"
    shutil.copytree(out, pristine, symlinks=True)
    shutil.copytree(out, reference, symlinks=True)
    _train_once(reference, resume=str(reference))
    new = _weights(reference)
    assert any(not torch.equal(old[k], new[k]) for k in old)

    def kill_at(n: int) -> int:
        shutil.rmtree(out)
        shutil.copytree(pristine, out, symlinks=True)
        return wait(run_child(lambda: _train_once(out, resume=str(out)), work, kill_at=n, log=str(log)))

    log = tmp_path / "kills.log"
    states = []
    for n in range(1, 80):
        status = kill_at(n)
        if status == 0:
            break
        assert status == -signal.SIGKILL, f"child failed at write {n} (status {status})"
        weights = _weights(out)
        state = "old" if all(torch.equal(weights[k], old[k]) for k in old) else "new"
        assert all(torch.equal(weights[k], (old if state == "old" else new)[k]) for k in old), n
        assert _step(out) == (1 if state == "old" else 2), f"killed at write {n}: weights and state differ"
        FileSystemReader(str(out / "training_state")).read_metadata()  # the DCP state is whole
        if state == "new" and "new" not in states:  # the first kill after the commit
            AutoModelForCausalLM.from_pretrained(out)
        states.append(state)
    else:
        pytest.fail("the save never completed")
    assert len(states) > 10 and states[0] == "old" and states[-1] == "new", (states, log.read_text())
    assert _step(out) == 2 and all(torch.equal(_weights(out)[k], new[k]) for k in new)
    # Killed just before the commit: the next run resumes from step 1 and cleans up the leftovers.
    assert kill_at(states.index("new")) == -signal.SIGKILL and _step(out) == 1
    assert len(list((out / ".crosschip").glob("save-*"))) == 2
    _train_once(out, resume=str(out), steps=3)
    assert _step(out) == 3
    assert [p.name for p in (out / ".crosschip").iterdir() if p.name.startswith(("save-", "tmp-"))] == [
        os.readlink(out / ".crosschip" / "current")]
    assert not [p for p in out.iterdir() if p.is_symlink() and not p.exists()]


def test_second_writer_is_refused_naming_the_first_ones_pid(tmp_path):
    """One run holds the output (blocked in the middle of its save); another run, and a plain
    save_pretrained, into the same directory fail at once naming it; the first one's kill leaves
    the previous save, and frees the output."""
    work = tmp_path / "w"
    out = work / "out"
    _train_once(out, stop_after=1)
    read_end, write_end = os.pipe()
    staged = lambda event, path: "/save-" in path or ".tmp-" in path  # noqa: E731 (new or old writer)
    pid = run_child(lambda: _train_once(out, resume=str(out)), work, block_when=staged, ready_fd=write_end)
    try:
        assert os.read(read_end, 1) == b"x"
        with pytest.raises(CheckpointError, match=rf"another process \(pid {pid}\) is writing a checkpoint"):
            _train_once(out, resume=str(out), steps=3)
        model = crosschip.from_pretrained(out)
        with pytest.raises(CheckpointError, match=rf"pid {pid}"):
            model.save_pretrained(out)
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    assert _step(out) == 1
    assert len(_train_once(out, resume=str(out)).losses) == 2


def test_existing_checkpoint_is_not_replaced_without_overwrite(tmp_path):
    first = _train_once(tmp_path / "a")
    other = _train_once(tmp_path / "b")
    before = _weights(first.out)
    with pytest.raises(ConfigurationError, match=r"--out .*a: already holds a checkpoint that this run did "
                                                 r"not start from; pass --overwrite"):
        _train_once(first.out, seed=9)
    with pytest.raises(ConfigurationError, match="pass --overwrite"):  # resuming another directory
        _train_once(first.out, resume=str(other.out), steps=3)
    assert all(torch.equal(t, before[k]) for k, t in _weights(first.out).items())
    _train_once(first.out, seed=9, overwrite=True)
    assert any(not torch.equal(t, before[k]) for k, t in _weights(first.out).items())
    # One run's optimizer state beside another's weights: refused on resume.
    state = (first.out / "training_state").resolve()
    shutil.rmtree(state)
    shutil.copytree((other.out / "training_state").resolve(), state)
    with pytest.raises(CheckpointError, match=r"meta\.json: belongs to save \w+, but the weights beside it "
                                              r"to save \w+; refusing a mixed checkpoint"):
        _train_once(tmp_path / "c", resume=str(first.out), steps=3)


def test_cli_refuses_an_out_that_is_a_file_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "crosschip.cli", "train", "--steps", "100000", "--out",
                             str(blocker), "--quiet"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"--out {blocker}: exists and is not a directory" in result.stderr
    assert "Traceback" not in result.stderr and blocker.read_text() == "not a directory"
