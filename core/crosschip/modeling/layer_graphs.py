"""A decoder's layers trained as CUDA graphs: ``from_pretrained(compile="cuda-graph")``,
``crosschip train --compile cuda-graph``.

Each layer's forward and backward are recorded once as CUDA graphs and replayed at every training
step: a launch per layer and direction instead of one per kernel. This is for backends whose
modules torch.compile cannot trace (Transformer Engine's), where the host launching a thousand
kernels per step, not the GPU, bounds a small model's step (``benchmarks/profile_step.py``);
torch.compile's ``reduce-overhead`` mode does the same for code it compiles.

The recording belongs to the backend (``crosschip_graph_function``: Transformer Engine's
``make_graphed_callables`` keeps its FP8 scaling state right in graphs); a backend without one
declines. The embedding, final norm, LM head and loss stay eager; so does any forward that the
recorded graphs do not describe, which then runs the layers as it always did:

- not training with gradients (evaluation, generation);
- another batch shape than the recorded one (one shape is recorded: each holds its layers'
  activations in its own memory pool);
- padding, packed documents or a cache (the graphs hold the causal attention of whole rows).

A graph reads the weights at the addresses it was recorded with: an optimizer's in-place update is
seen, a replaced parameter is not, so replaced parameters mean recording again. Its parameter
gradients are copied out of the graph's buffers (the next backward overwrites them), except when
the optimizer steps in the backward (:mod:`crosschip.training.in_backward`), which uses each one
and drops it before that backward ends.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from crosschip.errors import ConfigurationError
from crosschip.modeling.compilation import CUDA_GRAPH
from crosschip.training.in_backward import grads_consumed_at_once, paused


class _LayerCall(nn.Module):
    """One layer as a graphable callable: tensors in (the hidden states, then the leaves of its
    rotary tables), tensors out. The rotary module and the (plain causal) mask are fixed; they are
    kept outside the module tree, so the graph's parameters are the layer's and its adapter's."""

    def __init__(self, layer: nn.Module, rotary, tables_spec, mask, adapters=()):
        super().__init__()
        self.layer = layer
        # Adapter slots the layer's forward applies (a LoRA adapter is the model's child, not
        # the layer's): the graph's parameters too, or their gradients would not be computed.
        self.adapters = nn.ModuleList(adapters)
        self.__dict__["rotary"] = rotary
        self.tables_spec = tables_spec
        self.mask = mask

    def forward(self, hidden, *table_leaves):
        return self.layer(hidden, self.rotary, tree_unflatten(list(table_leaves), self.tables_spec), self.mask)


def _adapter_slots(model, index: int) -> list[nn.Module]:
    """The slots of the model's adapter (if any) that layer ``index`` applies."""
    adapter = getattr(model, "lora_adapter", None)
    if adapter is None:
        return []
    prefix = f"model.layers.{index}."
    return [slot for name, slot in adapter.by_prefix().items() if name.startswith(prefix)]


def check_graphable(model) -> None:
    """Raise a ConfigurationError naming what stops ``model``'s layers from training as graphs."""
    from crosschip.models.decoder import DecoderForCausalLM

    where = f"compile={CUDA_GRAPH!r}"
    rt = model.runtime
    if not isinstance(model, DecoderForCausalLM):
        raise ConfigurationError(f"{where} records decoder layers; {type(model).__name__} has none")
    if model.opts.moe is not None:
        raise ConfigurationError(f"{where}: a mixture of experts routes a different number of tokens to each "
                                 "expert at every step, which a recorded graph cannot; use compile=True")
    if rt.parallel.tp > 1 or rt.parallel.dp > 1:
        raise ConfigurationError(f"{where} runs on one device; found tp={rt.parallel.tp}, dp={rt.parallel.dp} "
                                 "(their collectives are not recorded); use compile=True")
    if rt.activation_checkpointing != "none":
        raise ConfigurationError(f"{where} keeps every layer's activations in its graphs; found "
                                 f"activation_checkpointing={rt.activation_checkpointing!r}, expected 'none'")
    if rt.graph_function() is None:
        backends = ", ".join(sorted({d.backend for d in rt.report.decisions}))
        raise ConfigurationError(f"{where}: none of this model's backends ({backends}) records layers as CUDA "
                                 "graphs (te does); for torch use compile={'mode': 'reduce-overhead'} "
                                 "(crosschip train --compile reduce-overhead), which records the layers it compiles")
    if rt.device.type != "cuda":
        raise ConfigurationError(f"{where} records CUDA graphs, which need a CUDA device (found {rt.device}); "
                                 "use compile=True")


class LayerGraphs:
    """The recorded graphs of one model's layers, for one input shape."""

    def __init__(self):
        self.recordings = 0  # how many times the layers were recorded (tests and diagnostics)
        self._calls = None
        self._key = None
        self._weights = None
        self._warned: set[str] = set()

    def prepare(self, model, input_ids, position_ids, mask, cache) -> bool:
        """Whether this forward replays the graphs, recording them first if it is the first
        forward of its kind. Called before the forward's autocast: recording runs its own."""
        reason = self._eager_reason(model, mask, cache)
        if reason is None:
            key = (tuple(input_ids.shape), tuple(position_ids.shape))
            if self._key is not None and key != self._key:
                reason = f"its shape {tuple(input_ids.shape)} is not the recorded {self._key[0]}"
        if reason is not None:
            if reason not in self._warned and model.training and torch.is_grad_enabled():
                self._warned.add(reason)
                warnings.warn(f"compile={CUDA_GRAPH!r}: a training forward runs its layers eagerly: {reason}",
                              stacklevel=4)
            return False
        # Recorded again for replaced parameters, for a change of which ones train (it decides
        # which gradients the graphs compute), and when the optimizer starts or stops stepping in
        # the backward (whether the graphs' gradient buffers may be handed out).
        weights = (tuple((p.data_ptr(), p.requires_grad) for p in model.parameters()),
                   grads_consumed_at_once(model.parameters()))
        if self._calls is None or weights != self._weights:
            self._record(model, input_ids, position_ids, mask, key, grads_consumed=weights[1])
            self._weights = weights
        return True

    @staticmethod
    def _eager_reason(model, mask, cache) -> str | None:
        if not (model.training and torch.is_grad_enabled()):
            return "not training"
        if cache is not None:
            return "it has a cache"
        if not mask.is_plain:
            return "it has padding or packed documents"
        return None

    def _record(self, model, input_ids, position_ids, mask, key, grads_consumed: bool) -> None:
        self.reset()
        decoder = model.model
        embedding = decoder.embed_tokens.weight
        rotaries = [decoder.rotary_emb, *decoder.layer_rotary]
        with torch.no_grad():
            tables = [rotary(position_ids, embedding.dtype) for rotary in rotaries]
        flat = [tree_flatten(t) for t in tables]
        calls, samples = [], []
        # A layer's input needs a gradient when anything before it trains (the embedding, or an
        # earlier layer: a frozen base with adapters); its graph computes that gradient only if
        # its sample input asks for one.
        upstream_trains = embedding.requires_grad
        for index, layer in enumerate(decoder.layers):
            which = decoder.rotary_of[index]
            leaves, spec = flat[which]
            call = _LayerCall(layer, rotaries[which], spec, mask, _adapter_slots(model, index)).train()
            calls.append(call)
            # Each layer its own sample tensors: they become its graph's static inputs, which its
            # backward reads after later layers have replayed.
            hidden = torch.zeros(*input_ids.shape, embedding.shape[-1], dtype=embedding.dtype,
                                 device=embedding.device, requires_grad=upstream_trains)
            samples.append((hidden, *(leaf.detach().clone() for leaf in leaves)))
            upstream_trains = upstream_trains or any(p.requires_grad for p in call.parameters())
        graph = model.runtime.graph_function()
        try:
            with paused():  # the recorder's warm-up and recorded backwards are not steps
                self._calls = graph(tuple(calls), tuple(samples), grads_consumed=grads_consumed)
        except RuntimeError as exc:
            raise ConfigurationError(f"compile={CUDA_GRAPH!r}: this model's layers could not be recorded as CUDA "
                                     f"graphs ({exc}); use compile=True or compile=False") from exc
        self._key = key
        self.recordings += 1

    def run(self, hidden, layer_tables):
        """The layers replayed on ``hidden``; ``layer_tables``: each layer's rotary tables."""
        for call, tables in zip(self._calls, layer_tables):
            hidden = call(hidden, *tree_flatten(tables)[0])
        return hidden

    def reset(self) -> None:
        """Drop the recorded graphs (and their memory pool)."""
        for call in self._calls or ():
            if hasattr(call, "reset"):
                call.reset()
        self._calls = self._key = self._weights = None
