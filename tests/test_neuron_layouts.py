"""The neuron backend's weight layouts, in one process: canonical -> NxD's shards -> canonical is
bitwise at every tp, platform and QKV form, and the K/V rows each rank holds are exactly those
neuronx-distributed's own GQA initialisation gives that rank (its ``repeat`` on trn1, its
``repeat_interleave`` on trn2), read from the real library."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosschip.specs import GatedMLPSpec, LinearSpec, QKVSpec

pytestmark = pytest.mark.neuron_cpu

_STANDIN_ROOTS = ("neuronx_distributed", "torch_xla", "torch_neuronx", "neuronxcc")


@pytest.fixture(autouse=True, scope="module")
def _nxd_stays_in_this_module():
    """NxD and its CPU-mode stand-ins (``torch_xla``...) leave ``sys.modules`` with this module,
    so that no later test in the process sees a ``torch_xla`` that is not installed."""
    import sys

    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in _STANDIN_ROOTS:
            del sys.modules[name]


class _Ctx:
    def __init__(self, tp):
        from crosschip.specs import ParallelSpec

        self.parallel = ParallelSpec(tp=tp)


@st.composite
def _attention(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 4]))
    heads = kv * group
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if heads % t == 0 and (kv % t == 0 or t % kv == 0)]))
    return QKVSpec(8 * heads, heads, kv, 4, bias=draw(st.booleans())), tp


def _canonical(spec: QKVSpec, gen):
    t = {f"{r}.weight": torch.randn(rows, spec.hidden_size, generator=gen)
         for r, rows in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size))}
    if spec.bias:
        t.update({f"{r}.bias": torch.randn(rows, generator=gen)
                  for r, rows in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size))})
    return t


@settings(max_examples=40, deadline=None)
@given(_attention(), st.sampled_from(["trn1", "trn2"]), st.booleans())
def test_round_trips_are_bitwise(case, platform, fused):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", platform)
        patch.setenv("CROSSCHIP_NEURON_FUSE_QKV", "1" if fused else "0")
        _round_trips(*case)


def _round_trips(spec: QKVSpec, tp: int) -> None:
    from crosschip_neuron import layout

    gen = torch.Generator().manual_seed(tp)
    canonical = _canonical(spec, gen)
    qkv = layout.qkv_layout(spec, _Ctx(tp))
    back = qkv.invert(qkv.apply(canonical))
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)
    o_proj = {"weight": torch.randn(spec.hidden_size, spec.q_size, generator=gen)}
    out = layout.out_projection_layout(LinearSpec(spec.q_size, spec.hidden_size, parallel="row",
                                                  input_heads=(spec.num_heads, spec.num_kv_heads)), _Ctx(tp))
    assert torch.equal(out.invert(out.apply(o_proj))["weight"], o_proj["weight"])
    mlp = {"gate.weight": torch.randn(8 * tp, 4, generator=gen), "up.weight": torch.randn(8 * tp, 4, generator=gen),
           "down.weight": torch.randn(4, 8 * tp, generator=gen)}
    gated = layout.gated_mlp_layout(GatedMLPSpec(4, 8 * tp), _Ctx(tp))
    back = gated.invert(gated.apply(mlp))
    assert all(torch.equal(back[k], mlp[k]) for k in mlp)


@pytest.mark.parametrize("kv,tp", [(1, 2), (2, 4), (1, 4), (2, 8)])
def test_kv_rows_per_rank_follow_nxd(monkeypatch, kv, tp):
    """trn1: each rank's K block equals the shard NxD's own GQA initialisation writes on that
    rank from the same master K weight (``repeat``: tiled heads). trn2: the ranks of each of
    NxD's KV-shared groups hold identical whole copies of one head, and the groups hold the heads
    in order. (NxD's trn2 initialisation applies ``repeat_interleave`` to rows, not heads, so for
    head_dim > 1 the copies it draws in one group differ; it is no reference for loaded weights.)"""
    from crosschip_neuron import cpu_mode, layout

    monkeypatch.setenv("CROSSCHIP_NEURON_FUSE_QKV", "0")
    cpu_mode.nxd()
    from neuronx_distributed.modules import qkv_linear
    from neuronx_distributed.parallel_layers import layers

    spec = QKVSpec(32, 8, kv, 4)
    copies = tp // kv
    master = torch.randn(spec.kv_size, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    canonical = _canonical(spec, torch.Generator()) | {"k.weight": master}
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")
    tiled = layout.qkv_layout(spec, _Ctx(tp)).apply(canonical)["weight_k"].chunk(tp)
    monkeypatch.setattr(qkv_linear, "get_tensor_model_parallel_size", lambda: tp)
    monkeypatch.setattr(layers, "get_tensor_model_parallel_size", lambda: tp)
    monkeypatch.setattr(qkv_linear, "set_tensor_model_parallel_attributes", lambda *a, **k: None)
    for rank in range(tp):
        monkeypatch.setattr(layers, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        shard = torch.empty(spec.kv_size * copies // tp, spec.hidden_size)
        qkv_linear._initialize_affine_weight(shard, spec.kv_size, spec.hidden_size, shard.shape[0], 0,
                                             lambda w: w.data.copy_(master), tp_size_multiplier=copies)
        assert torch.equal(tiled[rank], shard), ("trn1", rank)

    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    adjacent = layout.qkv_layout(spec, _Ctx(tp)).apply(canonical)["weight_k"].chunk(tp)
    heads = master.chunk(kv)
    for head, group in enumerate(layout.kv_groups(tp, copies, "trn2")):
        assert all(torch.equal(adjacent[rank], heads[head]) for rank in group), ("trn2", group)


def test_a_platform_nxd_does_not_know_is_refused(monkeypatch):
    from crosschip.errors import ConfigurationError
    from crosschip_neuron import layout

    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn9")
    with pytest.raises(ConfigurationError, match=r"platform target 'trn9' .* expected one of trn1, trn1n, inf2, "
                                                 r"trn2, trn3"):
        layout.qkv_layout(QKVSpec(32, 8, 1, 4), _Ctx(2))
    # Where nothing is replicated the platform does not enter the layout at all, and with one KV
    # head both platforms put its copies on every rank alike: only the label differs (which a
    # training state records, so a resume still names the platform it was saved under).
    assert layout.head_orders(QKVSpec(32, 8, 2, 4), 2)[2] == ""
    for tp in (2, 4, 8):
        trn1, trn2 = (layout.head_orders(QKVSpec(32, 8, 1, 4), tp, p) for p in ("trn1", "trn2"))
        assert trn1[:2] == trn2[:2] and trn1[2] != trn2[2]
