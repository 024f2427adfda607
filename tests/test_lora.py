"""LoRA and DoRA adapters against transformers + PEFT with the same adapter (float32 logits,
loss and every adapter gradient), bitwise round trips of PEFT's files, merge against PEFT's
merge_and_unload, a frozen base, and bad adapters refused whole."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import crosschip
from crosschip.errors import CheckpointError, ConfigurationError
from helpers import assert_rel_close, tiny_llama_config
from lora_helpers import ALL, crosschip_grads, peft_grads, peft_model
from zoo import zoo_configs

TOL = 1e-5
# Phi-3 has its own test below (fused targets). GPT-NeoX's projections (query_key_value, dense,
# dense_h_to_4h...) are not LoRA targets yet: LoraConfig.target_modules takes the Llama-style names,
# and a GPT-NeoX model refuses them by name (test_lora_names_the_projections_a_model_has).
CONFIGS = {k: v for k, v in zoo_configs().items() if not k.startswith(("phi3", "gpt_neox"))}
#: Cases whose float32 rounding sits just above TOL: DoRA on the torch backend's combined QKV for
#: Gemma 3 (its k_proj lora_B gradient at 1.1e-5), a different summation order of the weight norm.
LOOSER = {("gemma3_local_global", "torch", "dora"): 2e-5}


def _parity(model, reference, ids, tol=TOL):
    labels = ids.clone()
    expected = reference(input_ids=ids, labels=labels)
    expected.loss.backward()
    out = model(ids, labels=labels)
    out.loss.backward()
    assert_rel_close(out.logits, expected.logits, tol, "logits")
    assert abs(out.loss.item() - expected.loss.item()) <= tol * max(1.0, abs(expected.loss.item()))
    ours, theirs = crosschip_grads(model), peft_grads(reference)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for key in theirs:
        assert_rel_close(ours[key], theirs[key], tol, f"gradient of {key}")
    return out


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapter_matches_peft(tmp_path, name, backend, variant):
    config, _ = CONFIGS[name]
    targets = ALL if config.tie_word_embeddings else (*ALL, "lm_head")
    reference, adapter = peft_model(tmp_path, config, targets, dora=variant == "dora")
    model = crosschip.from_pretrained(tmp_path / "base", backend=backend, adapter=adapter)
    ids = torch.randint(1, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    _parity(model.train(), reference.train(), ids, LOOSER.get((name, backend, variant), TOL))


def test_lora_names_the_projections_a_model_has(tmp_path):
    from crosschip.errors import ConfigurationError
    from zoo import save_hf

    save_hf(tmp_path, zoo_configs()["gpt_neox_parallel"][0])
    with pytest.raises(ConfigurationError, match=r"the model has no 'q_proj' projection \(it has dense, "
                                                 r"dense_4h_to_h, dense_h_to_4h, embed_out, query_key_value\)"):
        crosschip.from_pretrained(tmp_path, backend="torch", lora=crosschip.LoraConfig(r=4))


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj",), ("up_proj", "o_proj")])
@pytest.mark.parametrize("rslora", [False, True])
def test_partial_targets_on_combined_projections(tmp_path, targets, rslora):
    config = tiny_llama_config()
    reference, adapter = peft_model(tmp_path, config, targets, rslora=rslora, r=8, alpha=16)
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch", adapter=adapter)
    assert sorted(s.hf_prefix.rsplit(".", 1)[1] for s in model.lora_adapter.slots.values()) == sorted(
        targets * config.num_hidden_layers)
    _parity(model, reference, torch.randint(1, config.vocab_size, (2, 16)))


@pytest.mark.parametrize("dora", [False, True])
def test_peft_files_round_trip_bitwise_through_every_layout(tmp_path, dora):
    config = tiny_llama_config()
    _, adapter = peft_model(tmp_path, config, dora=dora)
    stored = load_file(adapter / "adapter_model.safetensors")
    for backend in ("reference", "torch"):
        model = crosschip.from_pretrained(tmp_path / "base", backend=backend, adapter=adapter)
        model.save_adapter(tmp_path / backend)
        again = load_file(tmp_path / backend / "adapter_model.safetensors")
        assert set(again) == set(stored)
        for key in stored:  # each projection keeps its own lora_A
            assert torch.equal(again[key], stored[key]), key
        saved = json.loads((tmp_path / backend / "adapter_config.json").read_text())
        assert saved["r"] == 4 and saved["use_dora"] is dora and saved["peft_type"] == "LORA"


def test_crosschip_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    peft_model(tmp_path, config)  # only for the base checkpoint
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch",
                                      lora=crosschip.LoraConfig(r=4, alpha=16, use_dora=True, init="gaussian"))
    torch.manual_seed(0)
    with torch.no_grad():
        for slot in model.lora_adapter.slots.values():
            slot.lora_B.normal_(0, 0.1)
    model.save_adapter(tmp_path / "ours", base_model="tiny")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    ids = torch.randint(1, config.vocab_size, (2, 12))
    assert_rel_close(model(ids).logits, loaded(input_ids=ids).logits, TOL, "logits in PEFT")


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_merge_equals_peft_merge_and_unload_bitwise(tmp_path, backend, dora):
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(tie_word_embeddings=False)
    reference, adapter = peft_model(tmp_path, config, (*ALL, "lm_head"), dora=dora)
    model = crosschip.from_pretrained(tmp_path / "base", backend=backend, adapter=adapter)
    model.merge_adapter()
    merged = reference.merge_and_unload().state_dict()
    ours = model.hf_state_dict()
    for key, value in ours.items():
        assert torch.equal(value, merged[key]), key
    assert getattr(model, "lora_adapter", None) is None
    assert all(p.requires_grad for p in model.parameters())
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    ids = torch.randint(1, config.vocab_size, (1, 10))
    assert_rel_close(model(ids).logits, plain(ids).logits, TOL, "merged logits in transformers")


def test_only_the_adapter_trains(tmp_path):
    config = tiny_llama_config()
    peft_model(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch",
                                      lora=crosschip.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "down_proj")))
    before = {k: v.clone() for k, v in model.hf_state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * config.num_hidden_layers  # lora_A and lora_B per target per layer
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(1, config.vocab_size, (2, 12))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(model.get_parameter(n).grad is None for n in frozen)
    assert len(optimizer.state) == len(trainable)
    after = model.hf_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base untouched
    assert any(s.lora_B.abs().sum() > 0 for s in model.lora_adapter.slots.values())


# -- bad input -------------------------------------------------------------------------------
def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="r must be a positive integer, found 0"):
        crosschip.LoraConfig(r=0)
    with pytest.raises(ConfigurationError, match="unknown name 'qproj'"):
        crosschip.LoraConfig(target_modules=("qproj",))
    with pytest.raises(ConfigurationError, match="--lora: 'rank=3' is not one of"):
        crosschip.LoraConfig.parse("rank=3")
    assert crosschip.LoraConfig.parse("r=16,alpha=32,dora,targets=q_proj+v_proj") == crosschip.LoraConfig(
        r=16, alpha=32, use_dora=True, target_modules=("q_proj", "v_proj"))
    config = tiny_llama_config(tie_word_embeddings=True)
    peft_model(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch")
    with pytest.raises(ConfigurationError, match="the model has no 'lm_head' projection"):
        model.add_adapter(crosschip.LoraConfig(target_modules=("lm_head",)))
    assert getattr(model, "lora_adapter", None) is None


def _assert_untouched(model):
    assert getattr(model, "lora_adapter", None) is None
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_for_another_base_is_refused_whole(tmp_path):
    _, adapter = peft_model(tmp_path / "small", tiny_llama_config())
    peft_model(tmp_path / "big", tiny_llama_config(hidden_size=96))
    model = crosschip.from_pretrained(tmp_path / "big" / "base", backend="torch")
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A.weight' has shape \[4, 64\], expected \[4, 96\]"):
        model.load_adapter(adapter)
    _assert_untouched(model)


@pytest.mark.parametrize("damage", ["missing", "extra", "dtype"])
def test_adapter_file_with_wrong_keys_is_refused_whole(tmp_path, damage):
    config = tiny_llama_config()
    _, adapter = peft_model(tmp_path, config)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(sorted(tensors)))
    if damage == "missing":
        del tensors[key]
        expected = f"missing key '{key}'"
    elif damage == "extra":
        tensors["base_model.model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(1)
        expected = "unexpected key 'base_model.model.model.layers.0.mlp.extra.lora_A.weight'"
    else:
        tensors[key] = tensors[key].to(torch.int32)
        expected = "has dtype I32, expected a floating-point dtype"
    save_file(tensors, path)
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch")
    with pytest.raises(CheckpointError, match=expected):
        model.load_adapter(adapter)
    _assert_untouched(model)


def test_unsupported_peft_options_and_pickles_are_refused(tmp_path):
    config = tiny_llama_config()
    _, adapter = peft_model(tmp_path, config)
    raw = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**raw, "bias": "all"}))
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch")
    with pytest.raises(CheckpointError, match="adapter_config.json: bias='all' is not supported"):
        model.load_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="is a pickle and is never read"):
        model.load_adapter(adapter)
    _assert_untouched(model)


PHI3 = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", ["phi3_fused", "phi3_longrope_partial"])
def test_adapter_on_fused_checkpoint_projections_matches_peft(tmp_path, name, backend, variant):
    """Phi-3 stores q/k/v and gate/up fused in its checkpoint, so PEFT targets ``qkv_proj`` and
    ``gate_up_proj`` whole: one adapter over the fused rows, placed through the same layouts."""
    config, _ = zoo_configs()[name]
    reference, adapter = peft_model(tmp_path, config, (*PHI3, "lm_head"), dora=variant == "dora")
    model = crosschip.from_pretrained(tmp_path / "base", backend=backend, adapter=adapter)
    ids = torch.randint(1, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    _parity(model.train(), reference.train(), ids)
    model.save_adapter(tmp_path / "saved")
    from safetensors.torch import load_file

    saved, original = load_file(tmp_path / "saved" / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    original = {k: v for k, v in original.items() if ".base_layer." not in k}  # PEFT's copy of the LM head
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_fused_checkpoint_projection_is_declined_with_the_reason(tmp_path):
    config, _ = zoo_configs()["phi3_fused"]
    from zoo import save_hf

    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch")
    with pytest.raises(ConfigurationError, match=r"has no .q_proj. projection \(it has .*qkv_proj"):
        model.add_adapter(crosschip.LoraConfig(target_modules=("q_proj",)))
    _assert_untouched(model)


def test_example_trains_saves_and_merges(tmp_path):
    """examples/lora_finetune.py as its docstring shows it: the adapter PEFT loads gives the
    merged checkpoint's logits, and the loss went down."""
    import runpy
    import sys

    import peft
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    peft_model(tmp_path, config)
    argv = ["lora_finetune.py", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
            "--backend", "torch", "--dora", "--steps", "6"]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(__import__("pathlib").Path(__file__).parents[1] / "examples" / "lora_finetune.py"),
                       run_name="__main__")
    finally:
        sys.argv = old
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", attn_implementation="eager").eval()
    ids = torch.randint(1, config.vocab_size, (1, 10))
    assert_rel_close(merged(ids).logits, with_adapter(input_ids=ids).logits, 1e-5, "merged vs PEFT")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    assert not torch.allclose(merged(ids).logits, plain(ids).logits)  # the adapter learned something


@pytest.mark.parametrize("dora", [False, True])
def test_a_bf16_base_gets_float32_adapters_as_peft_does(tmp_path, dora):
    """PEFT's autocast_adapter_dtype: the adapter trains in float32 over a bf16 base, whose
    outputs stay bf16; merging rounds once to bf16."""
    config = tiny_llama_config()
    _, adapter = peft_model(tmp_path, config, dora=dora)
    model = crosschip.from_pretrained(tmp_path / "base", backend="torch", dtype="bf16", adapter=adapter).train()
    assert {p.dtype for p in model.lora_adapter.parameters()} == {torch.float32}
    ids = torch.randint(1, config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.lora_adapter.parameters())
    reference = crosschip.from_pretrained(tmp_path / "base", backend="reference", adapter=adapter)
    expected = reference(ids).logits
    assert_rel_close(out.logits.float(), expected, 3e-2, "bf16 logits")
    model.merge_adapter()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_rel_close(model(ids).logits.float(), expected, 3e-2, "merged bf16 logits")


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_merge_on_fused_checkpoint_projections_equals_peft_bitwise(tmp_path, backend, dora):
    config, _ = zoo_configs()["phi3_fused"]
    reference, adapter = peft_model(tmp_path, config, PHI3, dora=dora)
    model = crosschip.from_pretrained(tmp_path / "base", backend=backend, adapter=adapter)
    model.merge_adapter()
    merged = reference.merge_and_unload().state_dict()
    for key, value in model.hf_state_dict().items():
        assert torch.equal(value, merged[key]), key
