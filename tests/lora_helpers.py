"""A transformers model with a PEFT adapter of random (non-zero) weights, saved, for LoRA tests."""

from __future__ import annotations

import torch

from zoo import save_hf

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_model(path, config, targets=ALL, dora=False, rslora=False, r=4, alpha=8, seed=3):
    """``(peft_model, adapter_dir)``: the base saved under ``path/base``, an adapter whose
    lora_A, lora_B (and magnitudes) are random under ``path/adapter``."""
    import peft

    hf = save_hf(path / "base", config)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                    use_dora=dora, use_rslora=rslora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.copy_(param + noise if "magnitude" in name else noise)
    model.save_pretrained(path / "adapter")
    return model.eval(), path / "adapter"


def peft_grads(model) -> dict[str, torch.Tensor]:
    """Adapter gradients of a PEFT model under the names of its saved file."""
    out = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            key = name.replace(".default", "")
            out[key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = param.grad
    return out


def crosschip_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for slot in model.lora_adapter.slots.values():
        for key, param in slot.peft_tensors().items():
            if param.grad is not None:
                out[key] = param.grad
    return out


def assert_adapter_grads_match(model, single, tol: float, where: str) -> None:
    """Every adapter gradient of ``model`` (whole, whatever its sharding) equals ``single``'s."""
    from crosschip.weights import whole
    from helpers import assert_rel_close

    theirs, ours = crosschip_grads(single), {k: whole(v) for k, v in crosschip_grads(model).items()}
    assert set(ours) == set(theirs), where
    for key in theirs:
        assert_rel_close(ours[key], theirs[key], tol, f"{where} gradient of {key}")
