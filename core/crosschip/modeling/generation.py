"""Autoregressive generation for any :class:`crosschip.CausalLM`: greedy and sampling
(temperature, top-k, top-p). The model says how through the cache protocol
(:meth:`crosschip.CausalLM.new_cache`): with a cache (the decoder's :class:`KVCache`) each step
feeds only the new tokens and batches may be left-padded; without one each step runs the whole
sequence. Backend-neutral: the cache holds whatever the qkv projection and rotary components
produce, and attention components receive the full keys with a mask."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from crosschip.errors import ConfigurationError, CrosschipWarning


class KVCache:
    """Keys and values per layer, ``[batch, seq, kv_heads, head_dim]``, grown by concatenation."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigurationError(f"temperature must be > 0, found {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigurationError(f"top_k must be >= 1, found {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigurationError(f"top_p must be in (0, 1], found {self.top_p}")


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator=None) -> torch.Tensor:
    """Pick one token per row from ``[batch, vocab]`` logits."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the best always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as transformers' generate computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             sampling: SamplingConfig = SamplingConfig(), eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, prompt + new]`` tokens. Rows that emit ``eos_token_id`` are padded after it."""
    if max_new_tokens < 0:
        raise ConfigurationError(f"max_new_tokens must be >= 0, found {max_new_tokens}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], found shape {tuple(input_ids.shape)}")
    limit = model.max_positions
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:  # once per call, before the first token
        warnings.warn(f"generating up to {input_ids.shape[1] + max_new_tokens} positions (prompt "
                      f"{input_ids.shape[1]} + max_new_tokens {max_new_tokens}), past this model's "
                      f"max_position_embeddings={limit}: the model was not trained on those positions",
                      CrosschipWarning, stacklevel=4)  # the caller of model.generate
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    cache = model.new_cache()
    if cache is None and not bool(attention_mask.all()):
        raise ConfigurationError(f"{type(model).__name__} has no cache (its new_cache() is None), so its forward takes "
                                 "no attention mask: generate without padding, or give the model the cache protocol")
    tokens, mask = input_ids, attention_mask
    step_ids, positions = input_ids, positions_from_mask(attention_mask)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if cache is None:  # the whole sequence again: any causal LM's forward(input_ids)
            logits = model(tokens).logits[:, -1]
        else:
            logits = model(step_ids, attention_mask=mask, position_ids=positions, cache=cache,
                           last_logits_only=True).logits[:, -1]
        chosen = next_token(logits, sampling, generator)
        chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        if len(eos):
            finished |= torch.isin(chosen, eos)
            if bool(finished.all()):
                break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_ids = chosen[:, None]
        positions = positions[:, -1:] + 1
    return tokens
