"""The static KV cache: every layer's keys and values in one buffer per layer, preallocated for
the whole generation and written in place, so each decode step has the same shapes and reads
its write position from a device tensor. That is what lets the step be compiled once and
replayed as a CUDA graph (:mod:`crosschip.modeling.decode_step`); the dynamic
:class:`crosschip.modeling.generation.KVCache`, grown by concatenation, changes shape each step.

Invariant: slot ``i`` of a row holds the key of position ``i`` of that row's (left-padded)
token sequence, exactly where the dynamic cache would hold it, so the attention mask of the
dynamic path (padding, causal, sliding window, with ``q_offset`` the write position) hides the
same keys, and additionally every slot not written yet (they lie after the query).
"""

from __future__ import annotations

import torch

from crosschip.errors import ConfigurationError

#: The buffer length is rounded up to a multiple of this, so calls with nearby prompt lengths
#: share one compiled step (a new length means a new graph).
LENGTH_MULTIPLE = 128


def static_length(positions: int) -> int:
    """Slots for ``positions`` tokens, rounded up to :data:`LENGTH_MULTIPLE`."""
    return -(-positions // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


class StaticKVCache:
    """Keys and values per layer, ``[batch, max_length, kv_heads, head_dim]``, written in place.

    A buffer is allocated at a layer's first :meth:`update` from the keys it receives (their
    batch, heads, head size, dtype and device: whatever the backend's qkv projection and rotary
    produce, this rank's heads under tensor parallelism), zero-filled so masked slots hold no
    NaN. ``device`` is the model's (where the write position lives). ``seq_len`` is the write position as a 0-dim ``long`` tensor on the keys' device; the
    caller moves it on with :meth:`advance` after each forward (``generate`` does), outside any
    compiled region, so it never syncs with the host.
    """

    def __init__(self, num_layers: int, max_length: int, device=None):
        if max_length < 1:
            raise ConfigurationError(f"StaticKVCache max_length must be >= 1, found {max_length}")
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.position = torch.zeros((), dtype=torch.long, device=device)

    @property
    def seq_len(self) -> torch.Tensor:
        """Slots written so far (the offset of the next queries), a device tensor."""
        return self.position

    def advance(self, count: int) -> None:
        """Move the write position on by ``count`` slots (the length of the forward just run).
        A new tensor, not an in-place add: a compiled step may still read the old one."""
        self.position = self.position + count

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k``, ``v`` ``[batch, seq, kv_heads, head_dim]`` at the write position and
        return the whole buffers (the attention mask hides what is not written)."""
        if self.keys[layer] is None:
            self._allocate(layer, k, v)
        slots = self.position + torch.arange(k.shape[1], device=k.device)
        self.keys[layer].index_copy_(1, slots, k.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(1, slots, v.to(self.values[layer].dtype))
        return self.keys[layer], self.values[layer]

    def _allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[1] > self.max_length:
            raise ConfigurationError(f"a forward of {k.shape[1]} tokens does not fit a static cache of "
                                     f"{self.max_length} slots")
        batch = k.shape[0]
        self.keys[layer] = torch.zeros(batch, self.max_length, *k.shape[2:], dtype=k.dtype, device=k.device)
        self.values[layer] = torch.zeros(batch, self.max_length, *v.shape[2:], dtype=v.dtype, device=v.device)

    def buffers(self) -> list[torch.Tensor]:
        """Every allocated buffer (a compiled step marks them as static addresses)."""
        return [t for t in (*self.keys, *self.values) if t is not None]
