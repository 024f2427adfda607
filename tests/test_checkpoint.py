"""Hugging Face checkpoints in and out: transformers loads what we save, sharded round trips,
atomic saves, and clear errors for bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import crosschip
from crosschip import CheckpointError, ConfigurationError
from crosschip.checkpoint import SafetensorsCheckpoint
from helpers import assert_rel_close, save_hf_llama


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("tied", [False, True])
def test_save_loads_in_transformers_with_identical_logits(tmp_path, backend, tied):
    from transformers import AutoModelForCausalLM

    save_hf_llama(tmp_path / "in", tie_word_embeddings=tied)
    model = crosschip.from_pretrained(tmp_path / "in", backend=backend)
    model.save_pretrained(tmp_path / "out")
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) is not tied
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 10))
    assert_rel_close(reloaded(ids).logits, model(ids).logits, 1e-5, "transformers logits")
    original = load_file(tmp_path / "in" / "model.safetensors")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(original) - ({"lm_head.weight"} if tied else set())
    for key, tensor in saved.items():
        assert torch.equal(tensor, original[key]), key


def test_sharded_round_trip(tmp_path):
    save_hf_llama(tmp_path / "in")
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    again = crosschip.from_pretrained(tmp_path / "sharded", backend="reference")
    ids = torch.randint(0, 128, (1, 9))
    assert_rel_close(again(ids).logits, model(ids).logits, 1e-5, "logits after sharded round trip")
    for key, tensor in again.hf_state_dict().items():
        assert torch.equal(tensor, model.hf_state_dict()[key]), key


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_hf_llama(tmp_path / "in")
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch")
    target = tmp_path / "ckpt"
    model.save_pretrained(target, max_shard_size="40KB")
    (target / "tokenizer.json").write_text("{}")
    # Files as a reader sees them (top-level names are links into .crosschip/, transaction.py).
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    import crosschip.checkpoint.writer as writer

    calls = {"n": 0}
    real = writer.save_file

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "save_file", failing)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(CheckpointError, match="previous checkpoint there is unchanged"):
        model.save_pretrained(target, max_shard_size="40KB")
    after = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "in"]  # no half-written files
    assert len(list((target / ".crosschip").glob("save-*"))) == 1  # only the committed save

    monkeypatch.setattr(writer, "save_file", real)
    model.save_pretrained(target)  # a later good save replaces it and keeps foreign files
    assert (target / "tokenizer.json").read_text() == "{}"
    assert not list(target.glob("model-0000*"))


def test_save_into_unwritable_location(tmp_path):
    save_hf_llama(tmp_path / "in")
    model = crosschip.from_pretrained(tmp_path / "in", backend="reference")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write a checkpoint"):
        model.save_pretrained(blocker / "sub")


def _corrupt(path, mutate):
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    save_hf_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    _corrupt(file, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'model.layers.1.mlp.up_proj.weight' \(expected shape \[96, 64\]\)"):
        crosschip.from_pretrained(tmp_path, backend="torch")
    save_hf_llama(tmp_path)
    _corrupt(file, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected key 'model.layers.0.extra.weight' in model.safetensors"):
        crosschip.from_pretrained(tmp_path)
    save_hf_llama(tmp_path)
    _corrupt(file, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' in model.safetensors has shape \[8, 64\], expected \[16, 64\]"):
        crosschip.from_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_hf_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: .*truncated or corrupt"):
        crosschip.from_pretrained(tmp_path)


def test_index_pointing_outside_directory_is_rejected(tmp_path):
    save_hf_llama(tmp_path / "m")
    os.rename(tmp_path / "m" / "model.safetensors", tmp_path / "outside.safetensors")
    keys = load_file(tmp_path / "outside.safetensors").keys()
    index = {"weight_map": {k: "../outside.safetensors" for k in keys}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        crosschip.from_pretrained(tmp_path / "m")


def test_single_file_symlink_outside_directory_is_rejected(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")
    (tmp_path / "m").mkdir()
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"m/model.safetensors: a symlink to .*outside.safetensors, "
                                              "outside the checkpoint directory; refusing to read it"):
        SafetensorsCheckpoint(tmp_path / "m")
    # A link that stays inside the directory is fine.
    os.rename(tmp_path / "outside.safetensors", tmp_path / "m" / "weights.safetensors")
    os.remove(tmp_path / "m" / "model.safetensors")
    os.symlink("weights.safetensors", tmp_path / "m" / "model.safetensors")
    assert SafetensorsCheckpoint(tmp_path / "m").keys() == ["w"]


@pytest.mark.parametrize("weight_map, found", [
    (["model.embed_tokens.weight"], "a list"),
    ({"model.embed_tokens.weight": 3}, "'model.embed_tokens.weight' -> 3 (int)"),
    ({"model.embed_tokens.weight": None}, "'model.embed_tokens.weight' -> None (NoneType)"),
], ids=["list", "int-value", "null-value"])
def test_malformed_index_is_rejected_naming_the_file(tmp_path, weight_map, found):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(info.value) == (f"{index}: not a valid index: 'weight_map' must map tensor names to shard "
                               f"file names (strings), found {found}")


def test_integer_and_bool_tensors_are_refused_not_cast(tmp_path):
    save_hf_llama(tmp_path)
    down, norm = "model.layers.0.mlp.down_proj.weight", "model.norm.weight"
    _corrupt(tmp_path / "model.safetensors",
             lambda t: t.update({down: t[down].to(torch.int64), norm: t[norm] > 0}))
    with pytest.raises(CheckpointError) as info:
        crosschip.from_pretrained(tmp_path, backend="torch")
    message = str(info.value)
    for key, dtype in ((down, "torch.int64"), (norm, "torch.bool")):
        assert (f"key {key!r} in model.safetensors has dtype {dtype}, expected a floating-point dtype "
                "(the model's torch.float32)") in message


def test_missing_config_and_unknown_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        crosschip.from_pretrained(tmp_path)
    save_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigurationError, match="unsupported architecture .BertForMaskedLM.; supported: .*LlamaForCausalLM"):
        crosschip.from_pretrained(tmp_path)


def test_no_weights_file(tmp_path):
    save_hf_llama(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        crosschip.from_pretrained(tmp_path)


def test_load_casts_to_requested_dtype(tmp_path):
    save_hf_llama(tmp_path)
    model = crosschip.from_pretrained(tmp_path, backend="torch", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 10**9}, "vocab_size=1000000000 is beyond any plausible model"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, found 0"),
    ({"hidden_size": 65536, "intermediate_size": 1 << 19, "num_hidden_layers": 64, "num_attention_heads": 512,
      "num_key_value_heads": 512}, r"this process.s weights alone need [\d,.]+ GiB .* more than the [\d,.]+ GiB of memory of cpu"),
])
def test_absurd_sizes_rejected_before_allocating(tmp_path, change, message):
    save_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigurationError, match=message):
        crosschip.from_pretrained(tmp_path)


def test_load_hf_state_dict_refuses_integer_tensors_too(tmp_path):
    save_hf_llama(tmp_path)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    state = model.hf_state_dict()
    key = "model.layers.0.mlp.down_proj.weight"
    state[key] = state[key].to(torch.int32)
    with pytest.raises(CheckpointError, match=rf"key {key!r} in the given state dict has dtype torch.int32, "
                                              r"expected a floating-point dtype"):
        model.load_hf_state_dict(state)


def test_a_save_whose_layout_gives_a_wrong_shape_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    """The canonical save checks every tensor's shape against the Hugging Face one, not only the
    keys: a layout whose inverse transposed a weight is an error naming it, and nothing lands."""
    import crosschip
    from crosschip import weights
    from helpers import save_hf_llama

    save_hf_llama(tmp_path / "base")
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch")
    to_hf = weights.Binding.to_hf

    def transposed(self, physical):
        out = to_hf(self, physical)
        return {k: (v.t() if k.endswith("down_proj.weight") else v) for k, v in out.items()}

    monkeypatch.setattr(weights.Binding, "to_hf", transposed)
    with pytest.raises(Exception, match=r"down_proj.weight' the shape \(96, 64\), expected \(64, 96\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
