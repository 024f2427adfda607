"""LoRA and DoRA adapters on any backend, in Hugging Face PEFT's format.

An adapter keeps one ``lora_A`` and ``lora_B`` (and DoRA's magnitude) per Hugging Face projection
(``q_proj``, ``k_proj``, ...), in Hugging Face shapes, whatever layout the backend gives the base
weights: a combined ``qkv_proj`` carries three adapters, never one shared ``lora_A``. A backend
module applies the adapters of a weight where it computes that weight's output, by calling
:func:`adapt`; which rows of the output belong to which Hugging Face projection is read from the
backend's registered weight layout, so no backend writes adapter math or layout code of its own.
"""

from crosschip.lora.config import LoraConfig
from crosschip.lora.sites import adapt

__all__ = ["LoraConfig", "adapt"]
