"""The te backend on a machine without it: registered, unavailable with the reason, its weight
transforms round-trip bitwise (plain tensor functions), and FP8 is never silently dropped."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosschip import ConfigurationError, GatedMLPSpec, LinearSpec, NormSpec, QKVSpec, Runtime
from crosschip.specs import AttentionSpec, LayerNormSpec, MLPSpec, ParallelSpec
from crosschip.weights.layouts import canonical_shapes
from crosschip.plugins.descriptors import resolve_callable
from crosschip.plugins.registry import get_registry
from helpers import layout_of
from plugin_site import cpu_only


def _layout(component, spec):
    return layout_of("te", component, spec)


def _random(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@settings(max_examples=25, deadline=None)
@given(kv=st.integers(1, 4), group=st.sampled_from([1, 2, 7]), head_dim=st.sampled_from([2, 4, 8]),
       hidden=st.sampled_from([8, 16]), bias=st.booleans(), norm=st.booleans())
def test_qkv_round_trip_and_names(kv, group, head_dim, hidden, bias, norm):
    spec = QKVSpec(hidden, kv * group, kv, head_dim, bias=bias, input_norm=NormSpec(hidden) if norm else None)
    canonical = _random(canonical_shapes("qkv_projection", spec, fuses_input_norm=True))
    physical = _layout("qkv_projection", spec).apply(canonical)
    expected = {"proj.weight"} | ({"proj.bias"} if bias else set()) | ({"proj.layer_norm_weight"} if norm else set())
    assert set(physical) == expected
    back = _layout("qkv_projection", spec).invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


@settings(max_examples=25, deadline=None)
@given(hidden=st.sampled_from([8, 16]), inter=st.integers(1, 12), bias=st.booleans())
def test_gated_mlp_is_gate_then_up_halves(hidden, inter, bias):
    spec = GatedMLPSpec(hidden, inter, bias=bias, input_norm=NormSpec(hidden))
    canonical = _random(canonical_shapes("gated_mlp", spec, fuses_input_norm=True))
    layout = _layout("gated_mlp", spec)
    physical = layout.apply(canonical)
    assert torch.equal(physical["mlp.fc1_weight"][:inter], canonical["gate.weight"])
    assert torch.equal(physical["mlp.fc1_weight"][inter:], canonical["up.weight"])
    assert torch.equal(physical["mlp.fc2_weight"], canonical["down.weight"])
    assert torch.equal(physical["mlp.layer_norm_weight"], canonical["norm.weight"])
    back = layout.invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


def test_linear_and_norm_round_trip():
    for component, spec in (("out_projection", LinearSpec(8, 4, bias=True)), ("rms_norm", NormSpec(8))):
        canonical = _random(canonical_shapes(component, spec))
        layout = _layout(component, spec)
        back = layout.invert(layout.apply(canonical))
        assert all(torch.equal(back[k], canonical[k]) for k in canonical)
@cpu_only
def test_registered_and_unavailable_with_reason():
    record = get_registry().backend("te")
    assert record.descriptor.priority == 200 and "fp8" in record.descriptor.precisions
    assert set(get_registry().components_of("te")) == {
        "qkv_projection", "gated_mlp", "mlp", "out_projection", "linear", "rms_norm", "layer_norm",
        "attention", "rotary", "loss"}
    probe = record.probe()
    assert not probe.available and "transformer_engine is not installed" in probe.reason


@cpu_only
@pytest.mark.parametrize("backend", ["te", "torch", None])
def test_fp8_without_an_fp8_backend_is_an_error(backend):
    with pytest.raises(ConfigurationError, match="precision='fp8' needs a backend that implements FP8") as info:
        Runtime(backend, device="cpu", dtype="bf16", precision="fp8")
    assert "never replaced by a silent bf16 run" in str(info.value)
    if backend == "te":
        assert "te: unavailable: transformer_engine is not installed" in str(info.value)


def test_bad_precision_names():
    with pytest.raises(ConfigurationError, match="precision='int4'"):
        Runtime(precision="int4")
    with pytest.raises(ConfigurationError, match="fp8_recipe='fancy'"):
        Runtime(fp8_recipe="fancy")


def test_fp8_projection_on_a_backend_without_fp8_warns_or_fails_in_strict():
    """If an FP8 run's projection ends on a backend without FP8, it is never silent."""
    from crosschip import CrosschipWarning, StrictFallbackError
    from crosschip.plugins.descriptors import Probe

    registry = get_registry()
    te = registry.backend("te")
    te._probe = Probe(True, "pretend available, to reach the build")
    rt = Runtime("te", components={"out_projection": "torch"}, device="cpu", dtype="bf16", precision="fp8",
                 registry=registry)
    with pytest.warns(CrosschipWarning, match="out_projection .* was built by 'torch', which has no FP8"):
        rt.out_projection(LinearSpec(16, 16))
    strict = Runtime("te", components={"out_projection": "torch"}, device="cpu", dtype="bf16",
                     precision="fp8", registry=registry, strict=True)
    with pytest.raises(StrictFallbackError, match="computes in torch.bfloat16"):
        strict.out_projection(LinearSpec(16, 16))


# -- tensor parallelism: layouts and checks (pure functions; the 2-GPU parity test is in
# -- tests/test_te_tensor_parallel.py) ------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(blocks=st.sampled_from([1, 2, 3, 4]), per_block=st.integers(1, 4), cols=st.sampled_from([(), (3,), (2, 5)]))
def test_block_interleave_round_trip_is_bitwise(blocks, per_block, cols):
    from crosschip.weights.layouts import InterleaveBlocks, deinterleave_blocks, interleave_blocks

    a, b = (torch.randn(blocks * per_block, *cols) for _ in range(2))
    x = interleave_blocks(a, b, blocks)
    for r in range(blocks):  # block r of the result is [a_r; b_r]
        pair = x[2 * r * per_block:2 * (r + 1) * per_block]
        assert torch.equal(pair[:per_block], a[r * per_block:(r + 1) * per_block])
        assert torch.equal(pair[per_block:], b[r * per_block:(r + 1) * per_block])
    back = deinterleave_blocks(x, blocks)
    assert torch.equal(back[0], a) and torch.equal(back[1], b)
    step = InterleaveBlocks("a", "b", "ab", blocks)
    out = step.invert(step.apply({"a": a, "b": b, "other": a}))
    assert set(out) == {"a", "b", "other"} and torch.equal(out["a"], a) and torch.equal(out["b"], b)


def test_block_interleave_refuses_uneven_blocks():
    from crosschip.weights.layouts import deinterleave_blocks, interleave_blocks

    with pytest.raises(ValueError, match="cannot cut 6 rows into 4 equal blocks"):
        interleave_blocks(torch.zeros(6, 2), torch.zeros(6, 2), 4)
    with pytest.raises(ValueError, match="cannot cut 6 rows into 2 pairs"):
        deinterleave_blocks(torch.zeros(6, 2), 2)


class _Ctx:
    def __init__(self, tp=1, dp=1, sequence_parallel=False):
        from crosschip.specs import ParallelSpec

        self.parallel = ParallelSpec(tp=tp, dp=dp, sequence_parallel=sequence_parallel)


@settings(max_examples=25, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), per_rank=st.integers(1, 3), bias=st.booleans())
def test_gated_mlp_fc1_shard_of_each_rank_is_its_gate_then_up(tp, per_rank, bias):
    """Under TP, TE's SwiGLU halves each rank's local fc1 output: rank r's dim-0 shard of fc1 must
    be [gate rows of r; up rows of r]. The layout round-trips bitwise at every degree."""
    inter, hidden = tp * per_rank, 8
    spec = GatedMLPSpec(hidden, inter, bias=bias, input_norm=NormSpec(hidden))
    layout = resolve_callable(get_registry().layouts[("te", "gated_mlp")].transform)(spec, _Ctx(tp))
    canonical = _random(canonical_shapes("gated_mlp", spec, fuses_input_norm=True))
    physical = layout.apply(canonical)
    names = [("weight", "mlp.fc1_weight")] + ([("bias", "mlp.fc1_bias")] if bias else [])
    for role, name in names:
        shards = physical[name].chunk(tp, dim=0)
        for r, shard in enumerate(shards):
            rows = slice(r * per_rank, (r + 1) * per_rank)
            assert torch.equal(shard[:per_rank], canonical[f"gate.{role}"][rows])
            assert torch.equal(shard[per_rank:], canonical[f"up.{role}"][rows])
    back = layout.invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


def test_te_tensor_parallel_configuration_errors():
    from crosschip.parallel.distributed import check_gated_mlp, check_linear
    from crosschip.parallel.kv_replication import kv_copies
    from crosschip_te import parallel

    with pytest.raises(ConfigurationError, match="sequence_parallel=True shards the sequence .* needs tp > 1"):
        _Ctx(tp=1, sequence_parallel=True)  # ParallelSpec refuses it, for every backend
    assert parallel.tp_degree(_Ctx(tp=2, sequence_parallel=True)) == 2
    assert parallel.sequence_parallel(_Ctx(tp=2, sequence_parallel=True), 2)
    assert not parallel.sequence_parallel(_Ctx(tp=2), 2)
    with pytest.raises(ConfigurationError, match=r"data parallelism \(dp\) runs on backend='torch'"):
        parallel.tp_degree(_Ctx(tp=2, dp=2))
    assert parallel.tp_degree(_Ctx(tp=4)) == 4 and parallel.tp_degree(None) == 1
    # KV heads: split where tp divides them, replicated where tp is a multiple, else refused.
    assert kv_copies(QKVSpec(64, 8, 2, 8), 4) == 2 and kv_copies(QKVSpec(64, 8, 4, 8), 2) == 1
    with pytest.raises(ConfigurationError, match=r"tp=4 neither divides the number of KV heads \(3\) nor"):
        kv_copies(QKVSpec(96, 12, 3, 8), 4)
    with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the number of query heads \(7\)"):
        kv_copies(QKVSpec(56, 7, 7, 8), 2)
    with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the intermediate size \(95\)"):
        check_gated_mlp(GatedMLPSpec(64, 95, input_norm=NormSpec(64)), 2)
    with pytest.raises(ConfigurationError, match=r"tp=3 does not divide the input features .* \(64\)"):
        check_linear(LinearSpec(64, 64, parallel="row"), 3)
    assert kv_copies(QKVSpec(56, 7, 1, 8), 1) == 1  # tp=1: anything goes
    assert parallel.linear_mode(LinearSpec(8, 8, parallel="row"), 2) == "row"
    assert parallel.linear_mode(LinearSpec(8, 8, parallel="row"), 1) is None
    assert parallel.linear_mode(LinearSpec(8, 8), 2) is None


def test_te_shard_dims_follow_each_module_parallel_mode():
    """Which TE parameters are shards, read off the module's own mode (stand-in objects with
    TE's attribute names; TE itself is not installed here)."""
    from types import SimpleNamespace as NS

    from crosschip_te.parallel import shard_dims

    column = NS(tp_size=2, parallel_mode="column", weight_names=["weight"], bias_names=["bias"])
    assert shard_dims(column) == {"weight": 0, "bias": 0}
    row = NS(tp_size=2, parallel_mode="row", weight_names=["weight"], bias_names=["bias"])
    assert shard_dims(row) == {"weight": 1}  # TE adds the row-parallel bias after the all-reduce
    mlp = NS(tp_size=2, fc1_weight=None, set_parallel_mode=True)
    assert shard_dims(mlp) == {"fc1_weight": 0, "fc1_bias": 0, "fc2_weight": 1}
    assert shard_dims(NS(tp_size=1, parallel_mode="column", weight_names=["weight"])) == {}
    assert shard_dims(NS(tp_size=2, parallel_mode=None, weight_names=["weight"])) == {}


def test_fused_rope_declines_rope_types_that_scale_cos_and_sin(monkeypatch):
    """TE's fused RoPE takes angles only; a rope type with an attention scaling (YaRN) keeps
    the reference formula, and the decline says why. So does a TE without the fused RoPE where
    te imports it (only the module is stood in for: TE cannot be installed here)."""
    import sys
    import types

    from transformers import LlamaConfig

    from crosschip.specs import RopeSpec
    from crosschip_te import support

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=params)
    spec = RopeSpec(16, 256, tuple(sorted(params.items())), config)
    ctx = type("Ctx", (), {"dtype": torch.bfloat16})()
    assert "scales cos and sin by 1.13" in support.rotary(spec, ctx)
    default = RopeSpec(16, 256, (("rope_theta", 10000.0), ("rope_type", "default")))
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.attention"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    rope = types.ModuleType("transformer_engine.pytorch.attention.rope")
    monkeypatch.setitem(sys.modules, rope.__name__, rope)
    assert "has no fused RoPE at transformer_engine.pytorch.attention.rope" in support.rotary(default, ctx)
    rope.apply_rotary_pos_emb = lambda *args, **kwargs: None
    assert support.rotary(default, ctx) is None


def test_probe_names_devices_too_old_for_transformer_engine():
    from crosschip_te.capability import unsupported_reason

    assert unsupported_reason([(9, 0), (8, 0)]) is None
    reason = unsupported_reason([(9, 0), (7, 5)])
    assert reason.startswith("cuda:1 has compute capability 7.5; Transformer Engine needs 8.0 (Ampere)")
    assert "cuda:0" not in reason


def test_capabilities_are_read_without_initialising_cuda():
    """In a fresh interpreter: one capability per visible device where the driver's NVML answers,
    None where there is no driver (here), and CUDA never initialised either way."""
    import json
    import subprocess
    import sys

    code = ("import json, torch; from crosschip_te.capability import visible_capabilities as v; c = v(); "
            "print(json.dumps([c, torch.cuda.is_initialized(), torch.cuda.device_count()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    capabilities, initialised, devices = json.loads(out.stdout.strip().splitlines()[-1])
    assert initialised is False
    assert capabilities is None if devices == 0 else len(capabilities) == devices


@settings(max_examples=25, deadline=None)
@given(tp=st.sampled_from([2, 4, 8]), kv=st.sampled_from([1, 2]), bias=st.booleans())
def test_qkv_shard_of_each_rank_holds_its_queries_and_a_replica_of_their_kv_head(tp, kv, bias):
    """Where tp exceeds the KV heads, rank r's dim-0 shard of TE's QKV weight is its own query
    heads, then a copy of the KV head they attend to; the layout round-trips bitwise (the inverse
    keeps the first replica)."""
    heads, head_dim, hidden = 8, 4, 16
    spec = QKVSpec(hidden, heads, kv, head_dim, bias=bias, input_norm=NormSpec(hidden))
    layout = resolve_callable(get_registry().layouts[("te", "qkv_projection")].transform)(spec, _Ctx(tp))
    canonical = _random(canonical_shapes("qkv_projection", spec, fuses_input_norm=True))
    physical = layout.apply(canonical)
    per_rank, group = heads // tp, heads // kv
    for role, name in [("weight", "proj.weight")] + ([("bias", "proj.bias")] if bias else []):
        q, k, v = (canonical[f"{x}.{role}"].unflatten(0, (-1, head_dim)) for x in "qkv")
        for r, shard in enumerate(physical[name].chunk(tp, dim=0)):
            shard = shard.unflatten(0, (-1, head_dim))
            kv_head = r * per_rank // group  # the KV head of this rank's query heads
            assert torch.equal(shard[:per_rank], q[r * per_rank:(r + 1) * per_rank])
            assert torch.equal(shard[per_rank], k[kv_head]) and torch.equal(shard[per_rank + 1], v[kv_head])
    back = layout.invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


@pytest.mark.parametrize("has_option", [True, False])
def test_fused_loss_needs_a_transformer_engine_that_keeps_the_logits(monkeypatch, has_option):
    """Older TE kernels wrote the gradient over the logits in the forward; te's loss declines
    them, telling why. (Only the signature is stood in for: TE cannot be installed here.)"""
    import sys
    import types

    from crosschip_te import support

    def new(inp, target, label_smoothing=0.0, reduce_loss=False, dist_process_group=None,
            ignore_idx=-100, is_cg_capturable=False, *, overwrite_input=False):
        pass

    def old(inp, target, label_smoothing=0.0, reduce_loss=False, dist_process_group=None, ignore_idx=-100):
        pass

    module = types.ModuleType("transformer_engine.pytorch.cross_entropy")
    module.parallel_cross_entropy = new if has_option else old
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.cross_entropy", module)
    ctx = type("Ctx", (), {"dtype": torch.bfloat16})()
    reason = support.loss(None, ctx)
    assert reason is None if has_option else "overwrites the logits in its forward" in reason


# -- the newer kinds: layer_norm, mlp, linear, offset RMSNorm, LayerNorm input norms --------------
def _round_trip(component, spec, expected: dict[str, str], tp=1):
    """The layout maps each canonical role to exactly the TE parameter ``expected`` names, with
    the values untouched (plain renames), and inverts bitwise."""
    layout = resolve_callable(get_registry().layouts[("te", component)].transform)(spec, _Ctx(tp))
    canonical = _random(canonical_shapes(component, spec, fuses_input_norm=True))
    assert set(canonical) == set(expected), sorted(canonical)
    physical = layout.apply(dict(canonical))
    assert set(physical) == set(expected.values())
    for role, name in expected.items():
        assert torch.equal(physical[name], canonical[role]), role
    back = layout.invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)


MLP_NAMES = {"up.weight": "mlp.fc1_weight", "up.bias": "mlp.fc1_bias",
             "down.weight": "mlp.fc2_weight", "down.bias": "mlp.fc2_bias"}


@pytest.mark.parametrize("tp", [1, 2])
def test_mlp_layout_is_fc1_fc2_with_the_fused_norm(tp):
    # Not gated: fc1 is up as it is (a column shard of it is a plain dim-0 slice at any tp).
    layer = {"norm.weight": "mlp.layer_norm_weight", "norm.bias": "mlp.layer_norm_bias"}
    _round_trip("mlp", MLPSpec(16, 24, "gelu_pytorch_tanh", input_norm=LayerNormSpec(16)), MLP_NAMES | layer, tp)
    no_bias = {k: v for k, v in MLP_NAMES.items() if "bias" not in k}
    _round_trip("mlp", MLPSpec(16, 24, "relu", bias=False, input_norm=NormSpec(16)),
                no_bias | {"norm.weight": "mlp.layer_norm_weight"}, tp)


def test_layer_norm_inputs_of_qkv_and_gated_mlp_keep_their_bias():
    spec = QKVSpec(16, 4, 2, 4, input_norm=LayerNormSpec(16))
    layout = _layout("qkv_projection", spec)
    canonical = _random(canonical_shapes("qkv_projection", spec, fuses_input_norm=True))
    physical = layout.apply(dict(canonical))
    assert set(physical) == {"proj.weight", "proj.layer_norm_weight", "proj.layer_norm_bias"}
    assert torch.equal(physical["proj.layer_norm_bias"], canonical["norm.bias"])
    back = layout.invert(physical)
    assert set(back) == set(canonical) and all(torch.equal(back[k], canonical[k]) for k in canonical)
    gated = GatedMLPSpec(16, 8, "gelu_pytorch_tanh", input_norm=LayerNormSpec(16, 1e-6))
    physical = _layout("gated_mlp", gated).apply(_random(canonical_shapes("gated_mlp", gated, fuses_input_norm=True)))
    assert set(physical) == {"mlp.fc1_weight", "mlp.fc2_weight", "mlp.layer_norm_weight", "mlp.layer_norm_bias"}


def test_layer_norm_linear_and_offset_norm_layouts():
    _round_trip("layer_norm", LayerNormSpec(16), {"weight": "norm.weight", "bias": "norm.bias"})
    # Gemma's stored weight is the difference from one, exactly what zero_centered_gamma holds.
    _round_trip("rms_norm", NormSpec(16, offset=1.0), {"weight": "norm.weight"})
    for parallel in ("column", "row", "replicated"):
        _round_trip("linear", LinearSpec(16, 8, bias=True, parallel=parallel),
                    {"weight": "proj.weight", "bias": "proj.bias"}, tp=2)


class _SupportCtx:
    def __init__(self, dtype=torch.bfloat16, precision="bf16", **parallel):
        self.dtype = dtype
        self.runtime = type("Runtime", (), {"precision": precision})()
        self.parallel = ParallelSpec(**parallel)


TE_BUILDS = [
    ("layer_norm", LayerNormSpec(32)),
    ("layer_norm", LayerNormSpec(8, scope="head")),
    ("rms_norm", NormSpec(32, offset=1.0)),
    ("mlp", MLPSpec(32, 64, "gelu_pytorch_tanh", input_norm=LayerNormSpec(32))),
    ("mlp", MLPSpec(32, 64, "gelu_new", input_norm=NormSpec(32, offset=1.0))),
    ("mlp", MLPSpec(32, 48, "relu", bias=False, input_norm=NormSpec(32))),
    ("mlp", MLPSpec(32, 48, "quick_gelu", input_norm=NormSpec(32))),
    ("mlp", MLPSpec(32, 48, "relu2", input_norm=NormSpec(32))),
    ("gated_mlp", GatedMLPSpec(32, 64, "gelu_pytorch_tanh", input_norm=LayerNormSpec(32))),
    ("gated_mlp", GatedMLPSpec(32, 64, input_norm=NormSpec(32, offset=1.0))),
    ("qkv_projection", QKVSpec(32, 4, 2, 8, input_norm=LayerNormSpec(32))),
    ("qkv_projection", QKVSpec(32, 4, 2, 8, input_norm=NormSpec(32, offset=1.0))),
    ("linear", LinearSpec(32, 48, bias=True, parallel="column")),
]


TE_DECLINES = [
    ("layer_norm", LayerNormSpec(32, bias=False), "always holds and adds a learned bias"),
    ("layer_norm", LayerNormSpec(12), "hidden size divisible by 8, found 12"),
    ("rms_norm", NormSpec(32, offset=0.5), "zero_centered_gamma scales by exactly 1 + weight"),
    ("rms_norm", NormSpec(32, scope="projection"), "scope='projection'"),
    ("mlp", MLPSpec(32, 64, input_norm=NormSpec(32)),
     "'gelu' is the exact (erf) GELU; Transformer Engine's gelu kernel is the tanh approximation"),
    ("mlp", MLPSpec(32, 64, "gelu_pytorch_tanh"), "LayerNormMLP needs an input norm"),
    ("mlp", MLPSpec(32, 64, "tanh", input_norm=NormSpec(32)), "'tanh' has no Transformer Engine kernel"),
    ("mlp", MLPSpec(32, 64, "relu", input_norm=LayerNormSpec(32, bias=False)), "always holds and adds"),
    ("gated_mlp", GatedMLPSpec(32, 64, "gelu", input_norm=NormSpec(32)), "exact (erf) GELU"),
    ("qkv_projection", QKVSpec(32, 4, 2, 8, input_norm=NormSpec(32, offset=2.0)), "no other offset"),
    ("attention", AttentionSpec(4, 2, 8, softcap=50.0), "fused (cuDNN) attention does not support it"),
]


@pytest.mark.parametrize("component,spec", TE_BUILDS, ids=lambda x: x if isinstance(x, str) else "")
def test_te_accepts_what_transformer_engine_computes(component, spec):
    impl = get_registry().components[("te", component)]
    assert resolve_callable(impl.supports)(spec, _SupportCtx()) is None


@pytest.mark.parametrize("component,spec,reason", TE_DECLINES, ids=lambda x: x if isinstance(x, str) else "")
def test_te_declines_naming_what_transformer_engine_lacks(component, spec, reason):
    impl = get_registry().components[("te", component)]
    assert reason in resolve_callable(impl.supports)(spec, _SupportCtx())


def test_general_linear_declines_sequence_parallel_and_fp8_misfits():
    from crosschip_te import support

    assert "sequence-parallel stream layout" in support.general_linear(
        LinearSpec(32, 48, parallel="column"), _SupportCtx(tp=2, sequence_parallel=True))
    assert support.general_linear(LinearSpec(32, 48, parallel="row"), _SupportCtx(tp=2)) is None
    assert "divisible by 16, found [40]" in support.mlp(
        MLPSpec(32, 40, "relu", input_norm=NormSpec(32)), _SupportCtx(precision="fp8"))


def _pretend_te_runs_here(monkeypatch) -> Runtime:
    """A CPU runtime whose te backend passes the probe and device checks, to reach te's own
    supports checks and ``handles`` (nothing is built: that would import TE)."""
    import dataclasses

    from crosschip.plugins.descriptors import Probe

    registry = get_registry()
    record = registry.backend("te")
    monkeypatch.setattr(record, "_probe", Probe(True, "pretend available, to reach selection"))
    monkeypatch.setattr(record, "descriptor", dataclasses.replace(record.descriptor, device_types=("cpu",)))
    return Runtime("te", device="cpu", dtype="bf16", registry=registry)


@pytest.mark.parametrize("component,spec", TE_BUILDS,
                         ids=lambda x: x if isinstance(x, str) else "")
def test_runtime_chooses_te_for_the_extensions_it_declares(monkeypatch, component, spec):
    """``handles`` lists the extensions te computes (offset, a LayerNorm input norm): with te
    pretended available the runtime picks it, instead of declining on its behalf."""
    rt = _pretend_te_runs_here(monkeypatch)
    _, chosen, _, declines = rt.select(component, spec)
    assert chosen == "te", declines


def test_runtime_passes_over_te_with_its_reason(monkeypatch):
    rt = _pretend_te_runs_here(monkeypatch)
    _, chosen, _, declines = rt.select("mlp", MLPSpec(32, 64, input_norm=LayerNormSpec(32)))
    assert chosen == "torch" and "exact (erf) GELU" in dict(declines)["te"]
    _, chosen, _, declines = rt.select("attention", AttentionSpec(4, 2, 8, softcap=50.0))
    assert chosen == "torch" and "soft-capping" in dict(declines)["te"]
