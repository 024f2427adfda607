"""The main job: `crosschip train` learns, saves a checkpoint transformers loads, resumes
exactly, and reports bad input without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import crosschip
from crosschip.training.train import TrainArgs, train


def _args(tmp_path, **kw):
    base = dict(steps=24, batch_size=4, seq_len=32, lr=3e-3, out=str(tmp_path / "out"), seed=3)
    base.update(kw)
    return TrainArgs(**base)


def test_loss_falls_and_checkpoint_loads_everywhere(tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(_args(tmp_path, steps=40), progress=False)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0, result.losses
    ids = torch.tensor([list(b"The engineer trains")])
    logits = result.model.eval()(ids).logits
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-5, atol=1e-5)
    for backend in ("reference", "torch"):
        again = crosschip.from_pretrained(tmp_path / "out", backend=backend)
        torch.testing.assert_close(again(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_same_seed_same_model_on_every_backend(tmp_path):
    """Initialisation happens in the canonical layout, so the backend does not change the run."""
    a = train(_args(tmp_path / "a", steps=3, backend="reference"), progress=False)
    b = train(_args(tmp_path / "b", steps=3, backend="torch"), progress=False)
    assert len(a.losses) == len(b.losses) == 3
    for x, y in zip(a.losses, b.losses):  # float32 rounding of differently grouped matmuls only
        assert abs(x - y) <= 1e-5 * abs(x), (a.losses, b.losses)


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    full = train(_args(tmp_path / "full", steps=12), progress=False)
    half = train(_args(tmp_path / "half", steps=12, stop_after=6), progress=False)
    assert len(half.losses) == 6
    resumed = train(_args(tmp_path / "resumed", steps=12, resume=str(tmp_path / "half" / "out")), progress=False)
    # The same computation replayed from the saved model and optimizer state: bitwise.
    assert resumed.losses == full.losses


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "crosschip.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_train_then_generate(tmp_path):
    out = tmp_path / "cli"
    result = _cli("train", "--steps", "30", "--batch-size", "4", "--seq-len", "32", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "saved a Hugging Face checkpoint to" in result.stdout
    assert f"crosschip generate --model {out}" in result.stdout
    gen = _cli("generate", "--model", str(out), "--prompt", "The ", "--max-new-tokens", "20")
    assert gen.returncode == 0, gen.stderr
    # Byte-level tokens: 20 new tokens are 20 new characters of this ASCII corpus.
    assert gen.stdout.startswith("The ") and len(gen.stdout.rstrip("\n")) == len("The ") + 20


def test_no_save_writes_the_metrics_and_no_checkpoint(tmp_path):
    """--no-save: the run's losses are in OUT/metrics.jsonl and nothing else is written (an 8B
    training state is 48 GB; a sweep or a benchmark wants the losses only)."""
    result = _cli("train", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "o"),
                  "--quiet", "--no-save", "--log-every", "1")
    assert result.returncode == 0, result.stderr
    assert "no checkpoint written (--no-save)" in result.stdout
    rows = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")) == ["metrics.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["train", "--no-save", "--save-every", "5"], "--no-save writes no checkpoint, so it takes no --save-every"),
    (["train", "--model", "nonexistent-preset"], "neither a directory, a Hub model id (org/name) nor a preset; presets: small-llama, tiny-llama"),
    (["train", "--steps", "0"], "--steps must be positive, found 0"),
    (["train", "--backend", "tpu"], "unknown backend 'tpu'"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "/nonexistent: not a directory"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    result = _cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else _cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_training_state_of_another_model_is_refused_naming_the_shapes(tmp_path):
    from crosschip.errors import ConfigurationError
    from helpers import save_hf_llama, transplant_training_state

    small = dict(steps=1, batch_size=2, seq_len=16)
    save_hf_llama(tmp_path / "wide", vocab_size=300)
    save_hf_llama(tmp_path / "narrow", vocab_size=300, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    wide = train(TrainArgs(model=str(tmp_path / "wide"), out=str(tmp_path / "wide-out"), **small), progress=False)
    narrow = train(TrainArgs(model=str(tmp_path / "narrow"), out=str(tmp_path / "narrow-out"), **small),
                   progress=False)
    meta = (narrow.out / "training_state" / "meta.json").read_bytes()
    transplant_training_state(wide.out, narrow.out)
    # The wide tensors under the narrow run's own meta.json (its recorded --model and save id match).
    (narrow.out / "training_state" / "meta.json").write_bytes(meta)
    with pytest.raises(ConfigurationError, match=r"this training state was saved by a different model: "
                                                 r"model\.embed_tokens\.weight has shape \(300, 64\) there, "
                                                 r"\(300, 32\) in this model"):
        train(TrainArgs(model=str(tmp_path / "narrow"), resume=str(narrow.out), out=str(tmp_path / "never"),
                        **{**small, "steps": 2}), progress=False)


def test_training_state_in_another_physical_layout_is_refused(tmp_path):
    """meta.json records each component's weight layout; a state whose layout differs from the
    one this run builds (te's gate/up blocks follow tp) is refused, naming the component."""
    import json

    from crosschip.errors import ConfigurationError

    done = train(_args(tmp_path / "a", steps=1, backend="torch"), progress=False)
    meta_file = done.out / "training_state" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert "torch:gated_mlp" in meta["layouts"] and "InterleaveRows" in meta["layouts"]["torch:gated_mlp"]
    meta["layouts"]["torch:gated_mlp"] = "InterleaveBlocks(blocks=2)"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigurationError, match=r"holds the weights of torch:gated_mlp in another physical layout"):
        train(_args(tmp_path / "b", steps=2, backend="torch", resume=str(done.out)), progress=False)
