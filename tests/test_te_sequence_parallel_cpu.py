"""The te backend's sequence-parallel stream cuts (plain tensor functions and collectives, so
gloo on CPU runs them): the whole ``[batch, seq, hidden]`` -> this rank's ``[seq / tp, batch,
hidden]`` and back give the single-process values and gradients through a token-wise layer
whose weight gradient is partial on each rank until summed over the group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crosschip.errors import ConfigurationError
from gloo_spawn import spawn


def _run(rank: int, world: int, root: Path) -> None:
    import torch.distributed as dist

    from crosschip_te.sequence_parallel import _FromStream, _ToStream

    group = dist.group.WORLD
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, requires_grad=True)
    weight = torch.randn(5, requires_grad=True)
    target = torch.randn(3, 8, 5)

    def layer(h):  # a token-wise layer on the stream, like a norm
        return h * weight + h.pow(2)

    expected = layer(x)
    loss = ((expected - target) ** 2).sum()
    gx, gw = torch.autograd.grad(loss, (x, weight))

    stream = _ToStream.apply(x, group)
    assert stream.shape == (8 // world, 3, 5)
    assert torch.equal(stream, x.transpose(0, 1)[rank * 8 // world:(rank + 1) * 8 // world])
    got = _FromStream.apply(layer(stream), group)
    assert torch.equal(got, expected)
    loss = ((got - target) ** 2).sum()
    px, pw = torch.autograd.grad(loss, (x, weight))
    torch.testing.assert_close(px, gx, rtol=0, atol=0)
    # The weight saw only this rank's positions: partial until summed over the group.
    assert not torch.allclose(pw, gw)
    dist.all_reduce(pw, group=group)
    torch.testing.assert_close(pw, gw, rtol=1e-5, atol=1e-5)  # summed in another order
    with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the sequence length \(5\)"):
        _ToStream.apply(torch.randn(1, 5, 4), group)


def test_stream_cuts_match_one_process(tmp_path):
    spawn(2, tmp_path, _run)
