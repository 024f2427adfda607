"""What every crosschip causal LM shares: the forward contract, Hugging Face save, and the hooks
the weight adapter needs. Model math lives in ``crosschip.models``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from crosschip import weights
from crosschip.checkpoint.transaction import atomic_save
from crosschip.checkpoint.writer import write_weights
from crosschip.errors import CheckpointError
from crosschip.weights.layouts import IDENTITY, Transform
from crosschip.runtime import Runtime


@dataclass
class CausalLMOutput:
    """``logits`` ``[batch, seq, vocab]`` (None when not asked for), the mean next-token
    ``loss`` (None without labels), and a mixture of experts' ``aux_loss``, the routers'
    load-balancing loss (None for dense models; in ``loss`` only where the config says so).
    Logits a parallel plan left sharded (the vocab-parallel LM
    head's) are gathered whole here, differentiably, so a model's caller never sees a
    distributed tensor, whatever the model file returns."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None

    def __post_init__(self):
        logits = weights.whole(self.logits)
        # Logits gathered from a parallel head come back as an alias of the DTensor's local
        # tensor. Under FSDP2 an in-place op on a view the model returned (``logits /= t``) drops
        # FSDP's pre-backward hook, so the backward would skip the all-gather: the caller gets
        # a tensor of its own. (A plain head's logits are fresh; nothing is copied. Not asked under
        # torch.compile: ``_is_view`` does not trace, and compiled code returns no alias.)
        if torch.is_tensor(logits) and not torch.compiler.is_compiling() and logits._is_view():
            logits = logits.clone()
        self.logits = logits


class CausalLM(nn.Module):
    """Base class of the zoo. Subclasses set ``architectures`` (Hugging Face names they load)
    and ``config_class``, build their components from ``runtime`` and implement
    :meth:`checkpoint_names`."""

    architectures: tuple[str, ...] = ()
    config_class = None
    #: Checkpoint keys that may be present but are not loaded (e.g. a tied lm_head copy).
    ignored_checkpoint_keys: frozenset[str] = frozenset()

    def __init__(self, config, runtime: Runtime):
        super().__init__()
        self.config = config
        self.runtime = runtime

    def checkpoint_names(self) -> dict[str, dict[str, str]]:
        """``{component module path: {role prefix: Hugging Face prefix}}``. A component absent
        here keeps its own module path as prefix, e.g. ``model.norm`` -> ``model.norm.weight``."""
        return {}

    def checkpoint_transform(self, path: str, info) -> "Transform":
        """Roles of the component at ``path`` -> names in the checkpoint. Identity unless the
        Hugging Face checkpoint itself stores fused tensors (Phi-3's ``qkv_proj``)."""
        return IDENTITY

    # -- generation: the cache protocol (crosschip.modeling.generation) -------------------------------
    def new_cache(self):
        """A fresh cache for :func:`crosschip.modeling.generation.generate`, which then calls
        ``forward(step_ids, attention_mask=, position_ids=, cache=, last_logits_only=True)`` with
        only the new tokens, lets the model fill it (``cache.update(layer, k, v)`` returns the keys
        and values to attend over) and calls ``cache.advance(step_len)`` after each forward. None,
        the default, for a model whose forward takes only ``input_ids``: generation then runs the
        whole sequence every step, without padding. A model that also takes
        ``new_cache(max_length=None, device=None)`` (the decoder does, through
        :func:`crosschip.modeling.generation.kv_cache`) has a static cache too: ``max_length``
        preallocated slots, the write position a tensor on ``device``
        (``generate(cache="static")``)."""
        return None

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model was trained for (generation warns past it), or None."""
        return getattr(self.config, "max_position_embeddings", None)

    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id=None, pad_token_id=None, generator=None, cache: str | None = None,
                 compile=False):
        """Greedy or sampled continuation (with the model's cache, if it has one; left-padded
        batches then supported). ``cache``: ``"dynamic"`` (grown each step) or ``"static"``
        (preallocated for prompt + ``max_new_tokens``, written in place); None: static when
        compiling, else dynamic. ``compile``: True (or a dict of ``torch.compile`` options)
        compiles the per-token step over the static cache, as CUDA graphs on CUDA; the first
        call pays the compilation, later calls of the same batch size and length reuse it."""
        from crosschip.modeling.generation import SamplingConfig, generate

        return generate(self, input_ids, max_new_tokens, attention_mask,
                        SamplingConfig(do_sample, temperature, top_k, top_p),
                        eos_token_id, pad_token_id, generator, cache=cache, compile=compile)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (decoder layers): the units a data-parallel plan shards and
        gathers one at a time, so only one block's full parameters exist at once."""
        return []

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary frequencies) after ``to_empty``."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    # -- weights in the canonical layout ----------------------------------------------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under Hugging Face names and layouts (``state_dict()`` is the physical one)."""
        return weights.canonical_state_dict(self)

    def hf_grads(self) -> dict[str, torch.Tensor]:
        """Gradients mapped to Hugging Face names and layouts, for parity checks and tooling."""
        return weights.canonical_state_dict(self, grads=True)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        weights.load_canonical(self, _DictSource(state_dict), set(self.ignored_checkpoint_keys))

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB",
                        extra_files: Callable[[Path], None] | None = None) -> Path:
        """Write a Hugging Face checkpoint (safetensors + config.json) that transformers loads,
        as one atomic save that replaces only what it writes. ``extra_files(directory)`` may add
        files (tokenizer) to the same save. Under a process group every rank calls this."""
        with atomic_save(path, distributed=self._parallel()) as staging:
            self.write_pretrained(staging, max_shard_size, extra_files)
        return Path(path)

    def write_pretrained(self, staging: Path, max_shard_size: int | str = "5GB",
                         extra_files: Callable[[Path], None] | None = None) -> None:
        """The files of :meth:`save_pretrained` into the fresh ``staging`` directory of a save
        (``crosschip.checkpoint.atomic_save``), which may take more files (training state)."""
        sizes = weights.canonical_sizes(self)
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

        def write_extra(directory: Path) -> None:
            self.config.architectures = [self.architectures[0]]
            self.config.dtype = dtype
            self.config.save_pretrained(directory)
            generation = getattr(self, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(directory)
            if extra_files is not None:
                extra_files(directory)

        tensors = weights.iter_canonical(self)
        if not self._parallel():
            write_weights(staging, sizes, tensors, max_shard_size)
            write_extra(staging)
            return
        # Parallel: every rank takes part in gathering each component's shards, rank 0 writes.
        import torch.distributed as dist

        failure = None
        if dist.get_rank() == 0:
            try:
                write_weights(staging, sizes, tensors, max_shard_size)
                write_extra(staging)
            except Exception as exc:  # reported to every rank below, so none waits forever
                failure = f"{type(exc).__name__}: {exc}"
        # Every rank takes part in every remaining gather, whatever happened on rank 0.
        for _ in tensors:
            pass
        outcome = [failure]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise CheckpointError(f"saving {staging} failed on rank 0: {outcome[0]}")

    # -- adapters (LoRA, DoRA) in Hugging Face PEFT's format: crosschip.lora ----------------
    def add_adapter(self, config) -> None:
        """A new LoRA/DoRA adapter (:class:`crosschip.LoraConfig`); only its weights train."""
        from crosschip.lora import attach

        attach.attach(self, config)

    def load_adapter(self, directory) -> None:
        """Attach the PEFT adapter saved in ``directory`` (``adapter_config.json`` and
        ``adapter_model.safetensors``, from crosschip or from PEFT)."""
        from crosschip.lora import attach

        attach.load(self, directory)

    def save_adapter(self, directory, base_model: str | None = None) -> Path:
        """Write the adapter as PEFT does, so ``peft.PeftModel.from_pretrained`` loads it on the
        transformers model; ``base_model`` goes into ``base_model_name_or_path``."""
        from crosschip.lora import attach

        return attach.save(self, directory, base_model)

    def merge_adapter(self) -> None:
        """Fold the adapter into the base weights (PEFT's ``merge_and_unload``) and take it off."""
        from crosschip.lora import attach

        attach.merge(self)

    def remove_adapter(self) -> None:
        from crosschip.lora import attach

        attach.remove(self)

    def _parallel(self) -> bool:
        return self.runtime.parallel.size > 1 and torch.distributed.is_initialized()


class _DictSource:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return self.tensors[key].dtype

    def get(self, key):
        return self.tensors[key]

    def get_slice(self, key, index):
        return self.tensors[key][index]

    def describe(self, key):
        return "the given state dict"
