"""Hub model ids (``org/name``) load, train and generate from a Hugging Face cache that the test
builds, offline; a local directory wins over an id; the reader follows the cache's own
``snapshots/ -> blobs/`` links and no others."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import crosschip
from crosschip.checkpoint import SafetensorsCheckpoint
from crosschip.errors import CheckpointError, ConfigurationError
from helpers import hub_cache, save_hf_llama, word_tokenizer

REVISION = "c0ffee" * 6 + "abcd"  # a commit hash, as refs/main holds one
IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 64]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """``org/tiny`` (weights and a word-level tokenizer) in a hub cache, offline. huggingface_hub
    read HF_HUB_CACHE / HF_HUB_OFFLINE at its import, before this test: its settings are set as
    they would have been read (the subprocess test below uses the environment alone)."""
    from huggingface_hub import constants

    source = tmp_path / "local"
    save_hf_llama(source)
    word_tokenizer(source, 128)
    hub_cache(tmp_path / "hub", "org/tiny", source, REVISION)
    for name, value in {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory named org/tiny
    return source


def test_model_id_loads_like_its_local_directory(cache):
    for backend in ("reference", "torch"):
        expected = crosschip.from_pretrained(cache, backend=backend)(IDS).logits
        for revision in (None, REVISION):  # refs/main, and the commit itself
            got = crosschip.from_pretrained("org/tiny", backend=backend, revision=revision)(IDS).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_uncached_revision_or_id_is_one_clear_error(cache, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=rf"model id 'org/tiny' at revision 'v2': not in the Hugging Face "
                                              rf"cache {tmp_path / 'hub'} and downloads are off"):
        crosschip.from_pretrained("org/tiny", revision="v2")
    from crosschip.cli import main

    assert main(["train", "--model", "org/missing", "--out", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model id 'org/missing' at revision 'main': not in the Hugging Face cache" in err
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigurationError, match="from_pretrained 'org--x/y': not a valid Hub model id"):
        crosschip.from_pretrained("org--x/y")
    with pytest.raises(ConfigurationError, match="--revision v1: --model 'tiny-llama' is not a Hub model id"):
        crosschip.training.train.train(crosschip.training.train.TrainArgs(revision="v1", out=str(tmp_path / "never")))


def test_a_local_directory_wins_over_the_id(cache, tmp_path):
    save_hf_llama(tmp_path / "org" / "tiny", seed=1)  # ./org/tiny, a different model
    local = crosschip.from_pretrained("org/tiny")(IDS).logits
    torch.testing.assert_close(local, crosschip.from_pretrained(tmp_path / "org" / "tiny")(IDS).logits)
    assert not torch.equal(local, crosschip.from_pretrained(cache)(IDS).logits)
    with pytest.raises(ConfigurationError, match="org/tiny: a local directory, which has no revisions"):
        crosschip.from_pretrained("org/tiny", revision=REVISION)


def test_train_from_a_model_id_saves_its_tokenizer(cache, tmp_path):
    import json

    from crosschip.training.train import TrainArgs, train

    result = train(TrainArgs(model="org/tiny", revision=REVISION, steps=2, batch_size=2, seq_len=16,
                             out=str(tmp_path / "out"), log_every=1), progress=False)
    assert len(result.losses) == 2
    assert json.loads((result.out / "tokenizer.json").read_text()) == json.loads((cache / "tokenizer.json").read_text())
    meta = json.loads((result.out / "training_state" / "meta.json").read_text())
    assert (meta["args"]["model"], meta["args"]["revision"]) == ("org/tiny", REVISION)
    with pytest.raises(ConfigurationError, match=rf"--revision v2 \(saved {REVISION}\)"):
        train(TrainArgs(resume=str(result.out), revision="v2", steps=3, batch_size=2, seq_len=16,
                        out=str(tmp_path / "out")), progress=False)


def test_cli_generate_from_a_model_id_in_an_offline_environment(cache, tmp_path, capsys):
    """The environment alone (as a user sets it) points a fresh process at the cache; the id
    brings its tokenizer (the model's 128 tokens do not fit the byte-level fallback) and
    generates what its local directory does."""
    from crosschip.cli import main

    prompt = ["--prompt", "w1 w2 w3", "--max-new-tokens", "5"]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    by_id = subprocess.run([sys.executable, "-m", "crosschip.cli", "generate", "--model", "org/tiny", *prompt],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert by_id.returncode == 0, by_id.stderr
    capsys.readouterr()
    assert main(["generate", "--model", str(cache), *prompt]) == 0
    assert by_id.stdout == capsys.readouterr().out
    assert re.fullmatch(r"w1 w2 w3w\d+( w\d+){4}\n", by_id.stdout), by_id.stdout  # 5 words of its vocabulary


# -- the reader's rule for the cache's links ------------------------------------------------
def _sharded(tmp_path):
    hf = save_hf_llama(tmp_path / "plain")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    return hub_cache(tmp_path / "hub", "org/sharded", tmp_path / "sharded"), hub_cache(
        tmp_path / "hub", "org/single", tmp_path / "plain")


@pytest.mark.parametrize("case", ["another repo's blobs", "a sub-directory of blobs",
                                  "a shard in another repo's blobs", "not a snapshots directory",
                                  "not a models-- repo"])
def test_cache_links_into_their_own_blobs_are_read_and_no_wider(tmp_path, case):
    """Both cache snapshots (one file, and an index with shards) read through their links; each
    case then links one file beyond exactly that rule and is refused."""
    sharded, single = _sharded(tmp_path)
    for snapshot in (sharded, single):
        checkpoint = SafetensorsCheckpoint(snapshot)
        assert checkpoint.get("model.embed_tokens.weight").shape == (128, 64)
        checkpoint.close()
    hub = tmp_path / "hub"
    if case == "another repo's blobs":
        link, target = single / "model.safetensors", hub / "models--org--sharded" / "blobs" / "w"
    elif case == "a sub-directory of blobs":
        link, target = single / "model.safetensors", hub / "models--org--single" / "blobs" / "sub" / "w"
    elif case == "a shard in another repo's blobs":
        link, target = next(sharded.glob("model-00001-*")), hub / "models--org--single" / "blobs" / "w"
    else:  # the cache's relative link, from a directory that is not a model repo's snapshot
        repo = hub / ("models--org--fake" if case == "not a snapshots directory" else "datasets--org--fake")
        directory = repo / ("other" if case == "not a snapshots directory" else "snapshots") / "r"
        directory.mkdir(parents=True)
        link, target = directory / "model.safetensors", repo / "blobs" / "w"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((tmp_path / "plain" / "model.safetensors").read_bytes())
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory; refusing to read it"):
        SafetensorsCheckpoint(link.parent)
