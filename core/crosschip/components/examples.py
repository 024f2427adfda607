"""Shared pieces of the kinds' conformance examples and call contracts (torch imported lazily,
so declaring a kind stays import-light)."""

from __future__ import annotations

from crosschip.components.kind import Example

#: Batch and sequence length of every conformance example.
BATCH, SEQ = 2, 5


def randn(gen, *shape):
    import torch

    return torch.randn(*shape, generator=gen)


def hidden_example(features: int):
    """``x [batch, seq, features]``: the input of any projection or norm on the stream."""

    def example(spec, options, gen) -> Example:
        shape = options.get("input_shape", (BATCH, SEQ, getattr(spec, features)))
        return Example({"x": randn(gen, *shape) * options.get("input_scale", 1.0)})

    return example


def call_on_x(module, inputs, helpers) -> tuple:
    """The contract of a module taking one tensor: ``module(x)``, one or several outputs."""
    out = module(inputs["x"])
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
