"""Bad input to `crosschip train` and `crosschip generate` is one line, `crosschip: error: ...`,
naming the option (or file) and what was expected and found, with exit status 2. Run through
`crosschip.cli.main` in this process (what the console script calls): an exception escaping it
would be the traceback a user sees."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from crosschip.cli import main
from crosschip.errors import ConfigurationError
from crosschip.checkpoint.sizes import check_config_sizes
from crosschip.training.train import TrainArgs, train

SMALL = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--quiet"]
NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else "cuda:99"


def _saved_hf_llama(path, **config):
    from helpers import save_hf_llama

    save_hf_llama(path, **config)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A trained tiny checkpoint (byte-level tokenizer), and copies that break one thing each."""
    root = tmp_path_factory.mktemp("cli-errors")
    good = train(TrainArgs(steps=1, batch_size=2, seq_len=16, out=str(root / "good")), progress=False).out

    def variant(name, config=None, meta=None):
        shutil.copytree(good, root / name)
        for file, changes in (("config.json", config), ("training_state/meta.json", meta)):
            if changes:
                data = json.loads((root / name / file).read_text())
                for key, value in changes.items():
                    data.pop(key) if value is None else data.__setitem__(key, value)
                (root / name / file).write_text(json.dumps(data))
        return str(root / name)

    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    return {"good": str(good), "binary": str(root / "binary.txt"),
            "kv": variant("kv", config={"num_key_value_heads": 3}),
            "eps": variant("eps", config={"rms_norm_eps": -1e-5}),
            "vocab": str(_saved_hf_llama(root / "vocab", vocab_size=200)),
            "meta": variant("meta", meta={"backends": None, "step": "1"})}


CASES = {
    "device-unknown": (["train", "--device", "banana", *SMALL],
                       "--device 'banana' is not a torch device (expected e.g. cpu, cuda, cuda:1)"),
    "device-absent": (["train", "--device", NO_CUDA_DEVICE, *SMALL],
                      f"--device '{NO_CUDA_DEVICE}': " + ("CUDA is not available on this machine"
                                                          if NO_CUDA_DEVICE == "cuda" else "this machine has")),
    "text-binary": (["train", "--text", "{binary}", *SMALL],
                    "--text {binary}: not UTF-8 text (invalid start byte at byte 128)"),
    "meta-fields": (["train", "--resume", "{meta}", "--steps", "3"],
                    "not a complete training state (--resume {meta}): step is str, expected int; backends is missing"),
    "kv-heads": (["train", "--model", "{kv}", *SMALL],
                 "config.json: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    "rms-norm-eps": (["generate", "--model", "{eps}", "--prompt", "x"],
                     "config.json: rms_norm_eps must be a positive finite number, found -1e-05"),
    "vocab": (["generate", "--model", "{vocab}", "--prompt", "x"],
              "{vocab}: the model's vocab_size is 200, smaller than its tokenizer's 258 tokens"),
    "temperature": (["generate", "--model", "{good}", "--prompt", "x", "--temperature", "-1"],
                    "--temperature must be >= 0 (0 decodes greedily), found -1.0"),
    "top-p": (["generate", "--model", "{good}", "--prompt", "x", "--top-p", "1.5"],
              "--top-p must be in (0, 1], found 1.5"),
    "max-new-tokens": (["generate", "--model", "{good}", "--prompt", "x", "--max-new-tokens", "-5"],
                       "--max-new-tokens must be >= 0, found -5"),
    "optimizer-in-backward": (["train", "--optimizer-in-backward", *SMALL],
                              "--optimizer-in-backward needs --max-grad-norm 0: the gradient norm is known only "
                              "after every parameter stepped (found 1.0)"),
    "compile-dynamic": (["generate", "--model", "{good}", "--prompt", "x", "--compile", "--cache", "dynamic"],
                        "--compile needs --cache static (found --cache dynamic)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, dirs, tmp_path, capsys):
    argv, message = CASES[case]
    argv = [a.format(**dirs) for a in argv] + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("crosschip: error: ") and message.format(**dirs) in last, err
    assert not (tmp_path / "o").exists()


def test_generate_with_the_static_cache_prints_what_the_dynamic_one_does(dirs, capsys):
    printed = []
    for cache in ("dynamic", "static"):
        assert main(["generate", "--model", dirs["good"], "--prompt", "The ", "--max-new-tokens", "12",
                     "--cache", cache]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0]) > len("The ")


def test_lower_case_component_variable_names_the_valid_one(dirs, monkeypatch, capsys):
    monkeypatch.setenv("CROSSCHIP_BACKEND_attention", "torch")
    assert main(["generate", "--model", dirs["good"], "--prompt", "x", "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "crosschip: error: environment variable CROSSCHIP_BACKEND_attention: component variables are upper "
        "case; set CROSSCHIP_BACKEND_ATTENTION instead")


@pytest.mark.parametrize("eps", [0.0, math.nan, math.inf])  # transformers refuses other types
def test_rms_norm_eps_must_be_positive_and_finite(eps):
    from helpers import tiny_llama_config

    config = tiny_llama_config()
    config.rms_norm_eps = eps
    with pytest.raises(ConfigurationError, match="rms_norm_eps must be a positive finite number"):
        check_config_sizes(config)


def test_unknown_compile_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--compile", "fastest", *SMALL])
    assert caught.value.code == 2
    assert "argument --compile: invalid choice: 'fastest' (choose from 'default', 'reduce-overhead'" in \
        capsys.readouterr().err
