"""The trainable tensors of one adapted Hugging Face projection, in Hugging Face shapes."""

from __future__ import annotations

import math

import torch
from torch import nn

from crosschip.lora.config import LoraConfig


class LoraSlot(nn.Module):
    """``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` and, for DoRA, ``magnitude`` ``[out]``
    of the projection whose Hugging Face weight is ``<hf_prefix>.weight``. Whole on every rank:
    a tensor-parallel rank uses its rows (or columns) of them, and their gradients are summed
    over the ranks (see :mod:`crosschip.lora.sites`)."""

    def __init__(self, hf_prefix: str, out_features: int, in_features: int, config: LoraConfig,
                 device=None, dtype=None):
        super().__init__()
        self.hf_prefix = hf_prefix
        self.config = config
        self.scaling = config.scaling
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r, **kw))
        self.magnitude = nn.Parameter(torch.ones(out_features, **kw)) if config.use_dora else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's initialisation for ``config.init`` (``magnitude`` is set from the base weight
        by :func:`crosschip.lora.attach.attach`)."""
        init = self.config.init
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.config.r)
        else:
            nn.init.zeros_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Names of PEFT's ``adapter_model.safetensors`` -> tensors (this slot's whole ones)."""
        base = f"base_model.model.{self.hf_prefix}"
        out = {f"{base}.lora_A.weight": self.lora_A, f"{base}.lora_B.weight": self.lora_B}
        if self.magnitude is not None:
            out[f"{base}.lora_magnitude_vector"] = self.magnitude
        return out


class LoraAdapter(nn.Module):
    """Every slot of a model's adapter, by Hugging Face prefix. A child of the model (so its
    parameters train, save in the training state and move with the model) that is no
    component: its parameters have no place in the base model's Hugging Face checkpoint."""

    is_crosschip_adapter = True

    def __init__(self, config: LoraConfig):
        super().__init__()
        self.config = config
        self.slots = nn.ModuleDict()

    def add(self, slot: LoraSlot) -> None:
        self.slots[slot.hf_prefix.replace(".", "__")] = slot

    def by_prefix(self) -> dict[str, LoraSlot]:
        return {slot.hf_prefix: slot for slot in self.slots.values()}
