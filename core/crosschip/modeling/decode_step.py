"""One decode step (one new token per row through the model's static cache) and its compiled
form: ``generate(..., compile=True)``, or its CUDA graph: ``generate(..., compile="cuda-graph")``.

What is compiled is the forward of one token per row over a
:class:`crosschip.modeling.static_cache.StaticKVCache`: every input has the same shape at every
step (the ids and positions ``[batch, 1]``, the padding mask over the whole buffer, the write
position a device tensor), so ``torch.compile`` traces it once, and on CUDA its default mode
here, ``reduce-overhead``, replays it as a CUDA graph: one launch per token instead of one per
kernel, with no host round trip. The prompt (prefill) runs eagerly; its length differs per call
and it runs once. Sampling runs eagerly after the step (a few kernels; a generator-driven
``multinomial`` stays outside the graph).

The cache's buffers are static addresses for the graph: a compiled step keeps its cache and
reuses it (zeroed) for the next call of the same batch and length, as re-allocating would make
the graph re-record.
"""

from __future__ import annotations

import torch

from crosschip.errors import ConfigurationError
from crosschip.modeling.compilation import CUDA_GRAPH, OPTIONS


def decode(model, step_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """The next-token logits ``[batch, vocab]`` of one forward through ``cache``."""
    return model(step_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                 last_logits_only=True).logits[:, -1]


def compile_options(option, device: torch.device) -> dict | None:
    """``torch.compile`` keyword arguments for ``generate(compile=option)``: None for False or
    None; for True ``mode="reduce-overhead"`` (CUDA graphs) on CUDA and inductor's defaults
    elsewhere (CUDA graphs need CUDA); a dict is taken as given (keys among
    :data:`crosschip.modeling.compilation.OPTIONS`); :data:`CUDA_GRAPH` (CUDA only) as
    ``{"mode": CUDA_GRAPH}``, which :func:`compiled_decode` serves with :class:`GraphedDecode`."""
    if option is None or option is False:
        return None
    if option == CUDA_GRAPH:
        if device.type != "cuda":
            raise ConfigurationError(f"generate compile={CUDA_GRAPH!r} captures the step as a CUDA graph, which needs "
                                     f"a CUDA device (the input is on {device}); use compile=True")
        return {"mode": CUDA_GRAPH}
    if option is True:
        return {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    if isinstance(option, dict):
        unknown = sorted(set(option) - set(OPTIONS))
        if unknown:
            raise ConfigurationError(f"generate compile={option!r}: unknown torch.compile option(s) {unknown}; "
                                     f"expected some of {', '.join(OPTIONS)}")
        return dict(option)
    raise ConfigurationError(f"generate compile={option!r}: expected True, False, {CUDA_GRAPH!r} or a dict of "
                             f"torch.compile options ({', '.join(OPTIONS)})")


class _ReusedCache:
    """The static cache a step keeps (one batch size and length at a time): its buffers are the
    addresses its graph was recorded with."""

    def __init__(self):
        self._cache = None
        self._cache_key = None

    def cache(self, model, batch: int, max_length: int, device: torch.device):
        """A static cache of ``max_length`` slots for ``batch`` rows: the last one (zeroed, its
        write position back at 0) when it fits, else a new one."""
        key = (batch, max_length, device)
        if self._cache is not None and self._cache_key == key:
            for buffer in self._cache.buffers():
                buffer.zero_()
            self._cache.position = torch.zeros((), dtype=torch.long, device=device)
            return self._cache
        self._cache = model.new_cache(max_length=max_length, device=device)
        self._cache_key = key
        self._new_cache()
        return self._cache

    def _new_cache(self) -> None:
        """What a new cache invalidates."""


class CompiledDecode(_ReusedCache):
    """A model's compiled decode step for one set of compile options, and the static cache it
    reuses."""

    def __init__(self, options: dict):
        super().__init__()
        self.options = options
        self.function = torch.compile(decode, **options)
        self.cudagraphs = options.get("mode") in ("reduce-overhead", "max-autotune")
        self._marked: set[int] = set()

    def _new_cache(self) -> None:
        self._marked = set()

    def __call__(self, model, step_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        self._mark_static(cache)
        if self.cudagraphs and step_ids.device.type == "cuda":
            # A new iteration: the previous step's outputs (already consumed) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return self.function(model, step_ids, attention_mask, position_ids, cache)

    def _mark_static(self, cache) -> None:
        """The cache's buffers (allocated by the eager prefill) keep their addresses for the
        graph, so writing them in place is allowed inside it."""
        for buffer in cache.buffers():
            if id(buffer) not in self._marked:
                torch._dynamo.mark_static_address(buffer)
                self._marked.add(id(buffer))


class GraphedDecode(_ReusedCache):
    """The eager decode step recorded as one CUDA graph (``torch.cuda.CUDAGraph``) and replayed
    per token: one launch instead of one per kernel, for models whose modules torch.compile
    cannot trace (Transformer Engine's are opaque to it; compiled, the te step broke into pieces
    and ran slower than eager). The step's inputs are copied into the buffers the graph was
    recorded with, the cache's write position too (``advance`` rebinds it outside the step), and
    the logits come back in the graph's output buffer, valid until the next step. The graph is
    recorded on the first step of a new cache: a step writes the keys and values of its inputs
    at the write position, so the warm-up runs before recording write what the step writes."""

    def __init__(self):
        super().__init__()
        self.options = {"mode": CUDA_GRAPH}
        self._graph = None
        self._weights = None

    def _new_cache(self) -> None:
        self._graph = None

    def cache(self, model, batch: int, max_length: int, device: torch.device):
        # The graph reads the weights at the addresses it was recorded with: parameters replaced
        # since (not updated in place: an optimizer step is fine) mean recording again.
        weights = tuple(p.data_ptr() for p in model.parameters())
        if weights != self._weights:
            self._graph, self._weights = None, weights
        return super().cache(model, batch, max_length, device)

    def __call__(self, model, step_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        if self._graph is None:
            self._record(model, step_ids, attention_mask, position_ids, cache)
        else:
            for static, given in zip(self._inputs, (step_ids, attention_mask, position_ids, cache.position)):
                static.copy_(given)
        self._graph.replay()
        return self._logits

    def _record(self, model, step_ids, attention_mask, position_ids, cache) -> None:
        self._inputs = [t.clone() for t in (step_ids, attention_mask, position_ids, cache.position)]
        cache.position = self._inputs[3]  # the step reads the position the graph reads
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, workspaces) outside the graph
            for _ in range(2):
                decode(model, *self._inputs[:3], cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._logits = decode(model, *self._inputs[:3], cache)
        except RuntimeError as exc:
            raise ConfigurationError(f"generate compile={CUDA_GRAPH!r}: the decode step of this model could not be "
                                     f"recorded as a CUDA graph ({exc}); use compile=True or compile=False") from exc
        self._graph = graph


def compiled_decode(model, options: dict) -> CompiledDecode | GraphedDecode:
    """The model's compiled step for ``options``, made once and kept on the model, so later
    ``generate`` calls reuse its compiled code and graphs."""
    steps = model.__dict__.setdefault("_crosschip_decode_steps", {})
    key = repr(sorted(options.items()))
    if key not in steps:
        steps[key] = GraphedDecode() if options.get("mode") == CUDA_GRAPH else CompiledDecode(options)
    return steps[key]
