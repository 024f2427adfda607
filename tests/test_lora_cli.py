"""`crosschip train --lora` trains an adapter on a frozen base and saves it in PEFT's format
(PEFT loads it), resumes bitwise, and `crosschip generate --adapter` applies it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import crosschip
from crosschip.cli import main
from crosschip.errors import ConfigurationError
from crosschip.training.train import TrainArgs, train

SMALL = dict(steps=4, batch_size=2, seq_len=16, seed=1, lr=2e-2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from helpers import save_hf_llama

    path = tmp_path_factory.mktemp("lora-cli") / "base"
    save_hf_llama(path, vocab_size=300)  # byte-level tokens fit
    return path


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A finished 4-step DoRA run with dropout (the dropout masks must replay on resume)."""
    out = tmp_path_factory.mktemp("lora-cli-full") / "out"
    result = train(TrainArgs(model=str(base), out=str(out), lora="r=4,alpha=8,dora,dropout=0.1", **SMALL),
                   progress=False)
    return result


def test_adapter_loads_in_peft_with_the_same_logits_and_base_unchanged(base, trained):
    import peft
    from transformers import AutoModelForCausalLM

    out = trained.out
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"], config["lora_dropout"]) == (4, 8, True, 0.1)
    assert config["base_model_name_or_path"] == str(base.resolve())

    model = trained.model.eval()
    saved = load_file(base / "model.safetensors")
    now = {k: v.detach() for k, v in crosschip.weights.canonical_state_dict(model).items()}
    assert set(now) == set(saved)
    assert all(torch.equal(now[k], saved[k]) for k in saved), "the base weights changed"
    # Only the adapter trained, and it did train.
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("lora_adapter."))
    b = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in b.items())

    ids = torch.tensor([list(b"The engineer trains")])
    with torch.no_grad():
        ours = model(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(base).eval()
        plain = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, out).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the model


def test_resume_gives_the_bitwise_adapter_of_an_uninterrupted_run(base, trained, tmp_path):
    half = train(TrainArgs(model=str(base), out=str(tmp_path / "half"), stop_after=2,
                           lora="r=4,alpha=8,dora,dropout=0.1", **SMALL), progress=False)
    assert len(half.losses) == 2
    # No base weights and no optimizer state for them in the training state: the adapter's only.
    meta = json.loads((tmp_path / "half" / "training_state" / "meta.json").read_text())
    assert meta["args"]["lora"].startswith("r=4,alpha=8.0,dropout=0.1,")
    # --lora is inherited (spelled another way it is the same adapter) ...
    for i, lora in enumerate((None, "dropout=0.1,dora,alpha=8,r=4")):
        resumed = train(TrainArgs(model=str(base), out=str(tmp_path / f"resumed{i}"), resume=str(tmp_path / "half"),
                                  lora=lora, **SMALL), progress=False)
        assert resumed.losses == trained.losses
        full = load_file(trained.out / "adapter_model.safetensors")
        again = load_file(tmp_path / f"resumed{i}" / "adapter_model.safetensors")
        assert set(full) == set(again) and all(torch.equal(full[k], again[k]) for k in full)
    # ... and another adapter is refused.
    with pytest.raises(ConfigurationError, match=r"continues a run with other settings: --lora r=8"):
        train(TrainArgs(model=str(base), out=str(tmp_path / "never"), resume=str(tmp_path / "half"),
                        lora="r=8,alpha=8", **SMALL), progress=False)
    with pytest.raises(ConfigurationError, match=r"--override lora: a resume continues the adapter"):
        train(TrainArgs(model=str(base), out=str(tmp_path / "never"), resume=str(tmp_path / "half"),
                        override=["lora=r=8"], **SMALL), progress=False)


def test_periodic_saves_are_adapters_too(base, tmp_path):
    result = train(TrainArgs(model=str(base), out=str(tmp_path / "out"), lora="r=2,alpha=4,targets=q_proj+v_proj",
                             save_every=2, **{**SMALL, "steps": 3}), progress=False)
    (save,) = result.saves
    assert save.name == "checkpoint-2"
    tensors = load_file(save / "adapter_model.safetensors")
    assert {k.rsplit(".", 3)[-3] for k in tensors} == {"q_proj", "v_proj"}
    assert not (save / "model.safetensors").exists()


def test_cli_train_then_generate_with_the_adapter(base, tmp_path, capsys):
    from crosschip.training.tokenizer import load_tokenizer

    out = tmp_path / "cli"
    assert main(["train", "--model", str(base), "--lora", "r=4,alpha=16", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--lr", "5e-2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "saved a PEFT adapter" in printed
    assert f"crosschip generate --model {base.resolve()} --adapter {out}" in printed

    assert main(["generate", "--model", str(base), "--adapter", str(out), "--prompt", "The ",
                 "--max-new-tokens", "12"]) == 0
    generated = capsys.readouterr().out
    model = crosschip.from_pretrained(base, adapter=out)
    tokenizer = load_tokenizer(base)
    prompt = tokenizer.encode("The ")
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id)
    assert generated == "The " + tokenizer.decode(ids[0, len(prompt):].tolist()) + "\n"


@pytest.mark.parametrize("lora, message", [
    ("r=x", "--lora: 'r=x': invalid literal for int()"),
    ("rank=4", "--lora: 'rank=4' is not one of r=N"),
    ("r=4,targets=qproj", "--lora: LoraConfig.target_modules: unknown name 'qproj'"),
])
def test_bad_lora_is_one_line_naming_the_option(base, tmp_path, capsys, lora, message):
    assert main(["train", "--model", str(base), "--lora", lora, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crosschip: error: --lora: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_lora_needs_a_hugging_face_base(tmp_path, capsys):
    assert main(["train", "--lora", "r=4,alpha=8", "--out", str(tmp_path / "o")]) == 2
    assert "--lora: --model tiny-llama is a preset" in capsys.readouterr().err


def test_generate_adapter_must_be_a_directory(base, tmp_path, capsys):
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "--adapter " in capsys.readouterr().err
