"""Autoregressive generation for any :class:`crosschip.CausalLM`: greedy and sampling
(temperature, top-k, top-p). The model says how through the cache protocol
(:meth:`crosschip.CausalLM.new_cache`): with a cache each step feeds only the new tokens and
batches may be left-padded; without one each step runs the whole sequence. Two caches: the
dynamic :class:`KVCache` (grown by concatenation, the default) and the static
:class:`crosschip.modeling.static_cache.StaticKVCache` (preallocated, written in place: the one
whose decode step compiles, :mod:`crosschip.modeling.decode_step`). Backend-neutral: the cache holds whatever the qkv projection and rotary components
produce, and attention components receive the full keys with a mask."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
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

    def advance(self, count: int) -> None:
        """Nothing: the length is the keys' own (the cache protocol's step after a forward)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def kv_cache(num_layers: int, max_length: int | None = None, device=None):
    """What a model's ``new_cache`` returns for its ``num_layers`` attention layers: the dynamic
    :class:`KVCache` when ``max_length`` is None, else a
    :class:`crosschip.modeling.static_cache.StaticKVCache` of ``max_length`` slots whose write
    position lives on ``device``."""
    if max_length is None:
        return KVCache(num_layers)
    from crosschip.modeling.static_cache import StaticKVCache

    return StaticKVCache(num_layers, max_length, device)


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


#: ``generate(cache=...)``: how the keys and values of past tokens are kept.
CACHES = ("dynamic", "static")
#: On an accelerator, whether every row has emitted eos is read back every this many steps:
#: the read is a device-to-host sync that would stall the queue of launched steps. Steps run
#: past the end only emit padding and are cut off, so the tokens do not depend on it.
EOS_CHECK_EVERY = 8


def cache_kind(cache: str | None, compile_options: dict | None, model) -> str:
    """The cache ``generate`` uses: ``cache`` as asked (checked), or, when None, ``static`` if
    the step is compiled (the only cache whose step keeps its shapes) and ``dynamic`` if not."""
    if cache is None:
        cache = "static" if compile_options is not None else "dynamic"
    if cache not in CACHES:
        raise ConfigurationError(f"generate cache={cache!r}: expected one of {', '.join(CACHES)}")
    if compile_options is not None and cache != "static":
        raise ConfigurationError("generate compile=True needs cache='static' (found cache='dynamic'): the dynamic "
                                 "cache grows every step, so every step would compile anew")
    if cache == "static" and not _takes_max_length(model):
        raise ConfigurationError(f"generate cache='static': {type(model).__name__}.new_cache() takes no "
                                 "max_length, so it has no static cache; use cache='dynamic'")
    return cache


def _takes_max_length(model) -> bool:
    import inspect

    return "max_length" in inspect.signature(model.new_cache).parameters


def _eager(model):
    """Where a model compiled for training (``from_pretrained(compile=True)``) runs an uncompiled
    generation step: eagerly. The step's shapes change every token, so its compiled blocks would
    compile again for each length (and for each layer's cache index) up to torch's recompile
    limit, seconds of compilation per call for no gain."""
    return torch.compiler.set_stance("force_eager") if getattr(model, "compiled", None) is not None else nullcontext()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             sampling: SamplingConfig = SamplingConfig(), eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             cache: str | None = None, compile=False, eos_check_every: int | None = None) -> torch.Tensor:
    """``[batch, prompt + new]`` tokens. Rows that emit ``eos_token_id`` are padded after it;
    generation stops once every row has. ``cache``: ``"dynamic"`` or ``"static"`` (None: static
    when compiled, else dynamic); ``compile``: compile the per-token step
    (:mod:`crosschip.modeling.decode_step`); ``eos_check_every``: steps between reads of the
    finished rows (default 1 on CPU, :data:`EOS_CHECK_EVERY` elsewhere)."""
    from crosschip.modeling import decode_step
    from crosschip.modeling.static_cache import static_length

    if max_new_tokens < 0:
        raise ConfigurationError(f"max_new_tokens must be >= 0, found {max_new_tokens}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], found shape {tuple(input_ids.shape)}")
    device = input_ids.device
    options = decode_step.compile_options(compile, device)
    kind = cache_kind(cache, options, model)
    if eos_check_every is not None and eos_check_every < 1:
        raise ConfigurationError(f"generate eos_check_every must be >= 1, found {eos_check_every}")
    check_every = eos_check_every or (1 if device.type == "cpu" else EOS_CHECK_EVERY)
    batch, prompt = input_ids.shape
    limit = model.max_positions
    if limit is not None and prompt + max_new_tokens > limit:  # once per call, before the first token
        warnings.warn(f"generating up to {prompt + max_new_tokens} positions (prompt "
                      f"{prompt} + max_new_tokens {max_new_tokens}), past this model's "
                      f"max_position_embeddings={limit}: the model was not trained on those positions",
                      CrosschipWarning, stacklevel=4)  # the caller of model.generate
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    step = decode_step.decode
    if kind == "static":
        length = static_length(prompt + max_new_tokens)
        if options is not None:
            step = decode_step.compiled_decode(model, options)
            past = step.cache(model, batch, length, device)
        else:
            past = model.new_cache(max_length=length, device=device)
    else:
        length, past = prompt + max_new_tokens, model.new_cache()
    if past is None and not bool(attention_mask.all()):
        raise ConfigurationError(f"{type(model).__name__} has no cache (its new_cache() is None), so its forward takes "
                                 "no attention mask: generate without padding, or give the model the cache protocol")
    # Every token and the padding mask in buffers of their final length: a step writes one
    # column. The static cache attends over its whole buffer with one constant mask (slots not
    # written yet are causal-masked); the dynamic cache takes the mask's first columns.
    tokens = torch.full((batch, prompt + max_new_tokens), pad, dtype=input_ids.dtype, device=device)
    tokens[:, :prompt] = input_ids
    mask = torch.ones(batch, length, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt] = attention_mask
    positions = positions_from_mask(attention_mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    finished_at = torch.full((batch,), max_new_tokens - 1, dtype=torch.long, device=device)
    pad_row = torch.full((batch,), pad, dtype=input_ids.dtype, device=device)
    end, step_ids = max_new_tokens, input_ids
    for index in range(max_new_tokens):
        written = prompt + index
        if past is None:  # no cache: the whole sequence again, any causal LM's forward(input_ids)
            with _eager(model):
                logits = model(tokens[:, :written]).logits[:, -1]
        else:
            step_mask = mask if kind == "static" else mask[:, :written]
            forward = decode_step.decode if index == 0 else step  # the prompt runs eagerly
            # The eager step, or the one a CUDA graph records: a model compiled for training runs it eagerly.
            eager = forward is decode_step.decode or isinstance(forward, decode_step.GraphedDecode)
            with _eager(model) if eager else nullcontext():
                logits = forward(model, step_ids, step_mask, positions, past)
            past.advance(step_ids.shape[1])
            positions = positions[:, -1:] + 1
        chosen = torch.where(finished, pad_row, next_token(logits, sampling, generator))
        tokens[:, written] = chosen
        step_ids = chosen[:, None]
        if len(eos):
            newly = torch.isin(chosen, eos) & ~finished
            finished_at.masked_fill_(newly, index)
            finished |= newly
            if ((index + 1) % check_every == 0 or index + 1 == max_new_tokens) and bool(finished.all()):
                end = int(finished_at.max()) + 1  # steps past the last row's eos only padded
                break
    return tokens[:, :prompt + end]
