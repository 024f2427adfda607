"""Weight layouts: the pure transforms of ``crosschip.weights.layouts``, the layouts the torch and reference
backends register, the torch backend's exact physical layout (checked against constructions
written out here with explicit loops), its sharding property, and the weight adapter on a tiny
Llama (Hugging Face state dict <-> crosschip model <-> native combined state dict)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crosschip.weights import layouts as L
from crosschip.weights.layouts import canonical_shapes
from crosschip.plugins.descriptors import resolve_callable
from crosschip.plugins.registry import get_registry
from crosschip.specs import (
    EmbeddingSpec,
    GatedMLPSpec,
    LayerNormSpec,
    MLPSpec,
    LinearSpec,
    LMHeadSpec,
    NormSpec,
    QKVSpec,
)
from helpers import assert_rel_close, layout_of

FAST = settings(max_examples=40, deadline=None)
GROUP_SIZES = st.sampled_from([1, 2, 3, 4, 7])  # query heads per KV head (GQA ratio)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


# -- helpers ----------------------------------------------------------------------------------
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bits (so -0.0 and 0.0 differ)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in _BITS:
        return torch.equal(a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype]))
    return torch.equal(a, b)


def assert_same_dict(got: dict, want: dict, what: str = "") -> None:
    assert set(got) == set(want), f"{what}: keys differ: got {sorted(got)}, want {sorted(want)}"
    for k in want:
        assert bitwise_equal(got[k], want[k]), f"{what}: {k!r} differs"


def rand(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random values, distinct with overwhelming probability (so a misplaced row shows), one of
    them -0.0 (so a round trip that is equal but not bitwise identical shows too)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g)
    if t.numel():
        t.view(-1)[seed % t.numel()] = -0.0
    return t.to(dtype)


def random_tensors(shapes: dict, seed: int, dtype=torch.float32) -> dict:
    return {name: rand(shape, seed * 1000 + i, dtype) for i, (name, shape) in enumerate(sorted(shapes.items()))}


@st.composite
def qkv_specs(draw, kv_multiple_of: int = 1, bias=None):
    num_kv = kv_multiple_of * draw(st.integers(1, 4 if kv_multiple_of == 1 else 2))
    group = draw(GROUP_SIZES)
    head_dim = draw(st.integers(1, 8))
    hidden = draw(st.integers(1, 16))
    has_bias = draw(st.booleans()) if bias is None else bias
    return QKVSpec(hidden, num_kv * group, num_kv, head_dim, bias=has_bias)


@st.composite
def mlp_specs(draw, intermediate_multiple_of: int = 1):
    hidden = draw(st.integers(1, 16))
    intermediate = intermediate_multiple_of * draw(st.integers(1, 12))
    return GatedMLPSpec(hidden, intermediate, bias=draw(st.booleans()))


# Independent constructions of the torch backend's physical layout, one row block at a time.
def combined_qkv_by_loops(q, k, v, num_heads, num_kv_heads, head_dim):
    """``[Q_g0 | K_0 | V_0 | Q_g1 | K_1 | V_1 | ...]``: for each KV head g, its query heads, then K
    head g, then V head g."""
    group = num_heads // num_kv_heads
    rows = []
    for g in range(num_kv_heads):
        for h in range(g * group, (g + 1) * group):
            for d in range(head_dim):
                rows.append(q[h * head_dim + d])
        for d in range(head_dim):
            rows.append(k[g * head_dim + d])
        for d in range(head_dim):
            rows.append(v[g * head_dim + d])
    return torch.stack(rows)


def interleaved_by_loops(gate, up):
    rows = []
    for i in range(gate.shape[0]):
        rows.append(gate[i])
        rows.append(up[i])
    return torch.stack(rows)


# -- every registered layout of the torch and reference backends round-trips ------------------
BACKENDS = ("torch", "reference")
REGISTERED = sorted(k for k in get_registry().layouts if k[0] in BACKENDS)


def test_expected_layouts_are_registered():
    keys = set(REGISTERED)
    for component in ("qkv_projection", "gated_mlp", "out_projection"):
        assert ("torch", component) in keys
    for component in ("qkv_projection", "gated_mlp", "out_projection", "embedding", "rms_norm", "lm_head"):
        assert ("reference", component) in keys


@st.composite
def component_specs(draw, component: str):
    bias = draw(st.booleans())
    if component == "qkv_projection":
        return draw(qkv_specs())
    if component == "gated_mlp":
        return draw(mlp_specs())
    if component in ("out_projection", "linear"):
        return LinearSpec(draw(st.integers(1, 24)), draw(st.integers(1, 24)), bias=bias)
    if component == "mlp":
        return MLPSpec(draw(st.integers(1, 24)), draw(st.integers(1, 24)), bias=bias)
    if component == "layer_norm":
        return LayerNormSpec(draw(st.integers(1, 24)), bias=bias)
    if component == "embedding":
        return EmbeddingSpec(draw(st.integers(1, 24)), draw(st.integers(1, 16)))
    if component == "rms_norm":
        return NormSpec(draw(st.integers(1, 24)))
    if component == "lm_head":
        return LMHeadSpec(draw(st.integers(1, 16)), draw(st.integers(1, 24)), bias=bias, tied=draw(st.booleans()))
    # Any other kind (weightless, or a plugin's): the specs its own conformance cases declare.
    return draw(st.sampled_from([spec for _, spec, _ in get_registry().kind(component).cases()]))


@pytest.mark.parametrize("backend,component", REGISTERED, ids=[f"{b}-{c}" for b, c in REGISTERED])
@FAST
@given(data=st.data(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_registered_layout_round_trip(backend, component, data, seed, dtype):
    spec = data.draw(component_specs(component))
    transform = layout_of(backend, component, spec)
    canonical = random_tensors(canonical_shapes(component, spec), seed, dtype)

    physical = transform.apply(canonical)
    # canonical -> physical -> canonical is bitwise identical
    assert_same_dict(transform.invert(physical), canonical, "canonical round trip")

    # The physical names and shapes are exactly those of the module the backend builds, and the
    # module accepts them strictly; physical -> canonical -> physical is bitwise identical too.
    module = resolve_callable(get_registry().components[(backend, component)].factory)(spec, None)
    module = module.to(dtype)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in physical.items()} == expected
    module.load_state_dict(physical, strict=True)
    native = dict(module.state_dict())
    assert_same_dict(transform.apply(transform.invert(native)), native, "physical round trip")


# -- the torch backend's exact physical layout --------------------------------------------------
@FAST
@given(spec=qkv_specs(), seed=st.integers(0, 2**16), dtype=DTYPES)
@example(spec=QKVSpec(5, 7, 1, 3, bias=True), seed=0, dtype=torch.float32)  # GQA 7, one KV head
@example(spec=QKVSpec(6, 3, 3, 2, bias=True), seed=1, dtype=torch.float32)  # GQA 1 (MHA)
@example(spec=QKVSpec(4, 14, 2, 2, bias=False), seed=2, dtype=torch.bfloat16)  # GQA 7, two groups
def test_torch_qkv_physical_layout(spec, seed, dtype):
    canonical = random_tensors(canonical_shapes("qkv_projection", spec), seed, dtype)
    physical = layout_of("torch", "qkv_projection", spec).apply(canonical)
    want = {"weight"} | ({"bias"} if spec.bias else set())
    assert set(physical) == want
    heads = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    for p in sorted(want):
        q, k, v = (canonical[f"{r}.{p}"] for r in "qkv")
        assert bitwise_equal(physical[p], combined_qkv_by_loops(q, k, v, *heads)), p
        # Same thing from the pure function.
        assert bitwise_equal(L.interleave_qkv(q, k, v, spec.num_kv_heads), physical[p])


@FAST
@given(spec=mlp_specs(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_torch_gate_up_physical_layout(spec, seed, dtype):
    canonical = random_tensors(canonical_shapes("gated_mlp", spec), seed, dtype)
    physical = layout_of("torch", "gated_mlp", spec).apply(canonical)
    params = ("weight", "bias") if spec.bias else ("weight",)
    assert set(physical) == {f"{m}.{p}" for m in ("gate_up_proj", "down_proj") for p in params}
    for p in params:
        want = interleaved_by_loops(canonical[f"gate.{p}"], canonical[f"up.{p}"])
        assert bitwise_equal(physical[f"gate_up_proj.{p}"], want), p
        assert bitwise_equal(physical[f"down_proj.{p}"], canonical[f"down.{p}"]), p


@FAST
@given(spec=qkv_specs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2), seq=st.integers(1, 3))
@example(spec=QKVSpec(5, 7, 1, 3, bias=True), seed=0, batch=1, seq=2)
def test_torch_qkv_module_agrees_with_its_layout(spec, seed, batch, seq):
    """The layout and the module's own split agree: q, k, v equal the separate projections."""
    from crosschip_torch.components import CombinedQKV

    canonical = random_tensors(canonical_shapes("qkv_projection", spec), seed, torch.float64)
    module = CombinedQKV(spec).double()
    module.load_state_dict(layout_of("torch", "qkv_projection", spec).apply(canonical), strict=True)
    x = rand((batch, seq, spec.hidden_size), seed + 1, torch.float64)
    got = module(x)
    for r, out in zip("qkv", got):
        want = F.linear(x, canonical[f"{r}.weight"], canonical.get(f"{r}.bias"))
        torch.testing.assert_close(out, want.view(batch, seq, -1, spec.head_dim))


@FAST
@given(spec=mlp_specs(), seed=st.integers(0, 2**16))
def test_torch_gated_mlp_module_agrees_with_its_layout(spec, seed):
    from crosschip_torch.components import GatedMLP

    canonical = random_tensors(canonical_shapes("gated_mlp", spec), seed, torch.float64)
    module = GatedMLP(spec).double()
    module.load_state_dict(layout_of("torch", "gated_mlp", spec).apply(canonical), strict=True)
    x = rand((2, 3, spec.hidden_size), seed + 1, torch.float64)
    c = {k: canonical.get(k) for k in ("gate.weight", "gate.bias", "up.weight", "up.bias", "down.weight", "down.bias")}
    want = F.linear(F.silu(F.linear(x, c["gate.weight"], c["gate.bias"])) * F.linear(x, c["up.weight"], c["up.bias"]),
                    c["down.weight"], c["down.bias"])
    torch.testing.assert_close(module(x), want)


# -- sharding: a dim-0 shard holds whole KV groups and matching gate/up pairs --------------------
@pytest.mark.parametrize("world", [2, 4])
@FAST
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_torch_qkv_dim0_shard_is_the_rank_local_combined_weight(world, data, seed):
    spec = data.draw(qkv_specs(kv_multiple_of=world))
    canonical = random_tensors(canonical_shapes("qkv_projection", spec), seed)
    combined = layout_of("torch", "qkv_projection", spec).apply(canonical)
    local_heads, local_kv, d = spec.num_heads // world, spec.num_kv_heads // world, spec.head_dim
    local_spec = QKVSpec(spec.hidden_size, local_heads, local_kv, d, bias=spec.bias)
    for p in ("weight", "bias") if spec.bias else ("weight",):
        shards = combined[p].chunk(world, dim=0)
        assert len(shards) == world
        for r in range(world):
            q_r = canonical[f"q.{p}"][r * local_heads * d:(r + 1) * local_heads * d]
            k_r = canonical[f"k.{p}"][r * local_kv * d:(r + 1) * local_kv * d]
            v_r = canonical[f"v.{p}"][r * local_kv * d:(r + 1) * local_kv * d]
            want = combined_qkv_by_loops(q_r, k_r, v_r, local_heads, local_kv, d)
            assert bitwise_equal(shards[r], want), (p, r)
            local = layout_of("torch", "qkv_projection", local_spec).apply(
                {f"{role}.{p}": t for role, t in zip("qkv", (q_r, k_r, v_r))})
            assert bitwise_equal(shards[r], local[p]), (p, r)

    # The module itself works unchanged on a column shard: rank r gets its own heads.
    from crosschip_torch.components import CombinedQKV

    x = rand((1, 2, spec.hidden_size), seed + 7)
    full = CombinedQKV(spec)
    full.load_state_dict(combined, strict=True)
    q, k, v = full(x)
    w_shards = combined["weight"].chunk(world, dim=0)
    b_shards = combined["bias"].chunk(world, dim=0) if spec.bias else [None] * world
    for r in range(world):
        shard = CombinedQKV(spec)
        shard.weight = torch.nn.Parameter(w_shards[r])
        shard.bias = None if b_shards[r] is None else torch.nn.Parameter(b_shards[r])
        q_r, k_r, v_r = shard(x)
        torch.testing.assert_close(q_r, q[:, :, r * local_heads:(r + 1) * local_heads])
        torch.testing.assert_close(k_r, k[:, :, r * local_kv:(r + 1) * local_kv])
        torch.testing.assert_close(v_r, v[:, :, r * local_kv:(r + 1) * local_kv])


@pytest.mark.parametrize("world", [2, 4])
@FAST
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_torch_gate_up_dim0_shard_is_the_rank_local_interleave(world, data, seed):
    spec = data.draw(mlp_specs(intermediate_multiple_of=world))
    canonical = random_tensors(canonical_shapes("gated_mlp", spec), seed)
    physical = layout_of("torch", "gated_mlp", spec).apply(canonical)
    local = spec.intermediate_size // world
    for p in ("weight", "bias") if spec.bias else ("weight",):
        shards = physical[f"gate_up_proj.{p}"].chunk(world, dim=0)
        assert len(shards) == world
        for r in range(world):
            gate_r = canonical[f"gate.{p}"][r * local:(r + 1) * local]
            up_r = canonical[f"up.{p}"][r * local:(r + 1) * local]
            assert bitwise_equal(shards[r], interleaved_by_loops(gate_r, up_r)), (p, r)
            assert bitwise_equal(shards[r], L.interleave_rows(gate_r, up_r)), (p, r)


# -- pure tensor functions ----------------------------------------------------------------------
trailing_dims = st.lists(st.integers(1, 4), min_size=0, max_size=2)


@FAST
@given(spec=qkv_specs(), rest=trailing_dims, seed=st.integers(0, 2**16), dtype=DTYPES)
@example(spec=QKVSpec(2, 7, 1, 2), rest=[3], seed=0, dtype=torch.float32)
@example(spec=QKVSpec(2, 4, 4, 3), rest=[], seed=0, dtype=torch.float32)
def test_interleave_qkv_split_qkv_round_trip(spec, rest, seed, dtype):
    q = rand((spec.q_size, *rest), seed, dtype)
    k = rand((spec.kv_size, *rest), seed + 1, dtype)
    v = rand((spec.kv_size, *rest), seed + 2, dtype)
    combined = L.interleave_qkv(q, k, v, spec.num_kv_heads)
    assert combined.shape == (spec.q_size + 2 * spec.kv_size, *rest)
    assert bitwise_equal(combined, combined_qkv_by_loops(q, k, v, spec.num_heads, spec.num_kv_heads, spec.head_dim))
    q2, k2, v2 = L.split_qkv(combined, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    for a, b in ((q2, q), (k2, k), (v2, v)):
        assert bitwise_equal(a, b)
    # and physical -> canonical -> physical
    assert bitwise_equal(L.interleave_qkv(q2, k2, v2, spec.num_kv_heads), combined)


@FAST
@given(n=st.integers(0, 12), rest=trailing_dims, seed=st.integers(0, 2**16), dtype=DTYPES)
def test_interleave_rows_round_trip(n, rest, seed, dtype):
    a, b = rand((n, *rest), seed, dtype), rand((n, *rest), seed + 1, dtype)
    x = L.interleave_rows(a, b)
    assert bitwise_equal(x, interleaved_by_loops(a, b) if n else torch.empty((0, *rest), dtype=dtype))
    a2, b2 = L.deinterleave_rows(x)
    assert bitwise_equal(a2, a) and bitwise_equal(b2, b)
    assert bitwise_equal(L.interleave_rows(a2, b2), x)


@FAST
@given(data=st.data(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_concat_split_round_trip(data, seed, dtype):
    ndim = data.draw(st.integers(1, 3))
    dim = data.draw(st.integers(-ndim, ndim - 1))
    base = data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    sizes = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    parts = []
    for i, s in enumerate(sizes):
        shape = list(base)
        shape[dim] = s
        parts.append(rand(shape, seed + i, dtype))
    whole = L.concat(parts, dim)
    assert whole.shape[dim] == sum(sizes) and whole.is_contiguous()
    back = L.split(whole, sizes, dim)
    assert len(back) == len(parts)
    for got, want in zip(back, parts):
        assert bitwise_equal(got, want) and got.is_contiguous()
    assert bitwise_equal(L.concat(back, dim), whole)


# -- reversible dict transforms ------------------------------------------------------------------
names = st.text(alphabet="abcdefgh._", min_size=1, max_size=6)


@FAST
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_rename_round_trip(data, seed):
    canonical_names = data.draw(st.lists(names, min_size=1, max_size=6, unique=True))
    renamed = data.draw(st.lists(st.sampled_from(canonical_names), unique=True))
    # physical names: fresh, distinct, and not clashing with a key left as it is
    physical_names = [f"P{i}:{n}" for i, n in enumerate(renamed)]
    t = L.Rename(tuple(zip(renamed, physical_names)))
    tensors = {n: rand((i + 1,), seed + i) for i, n in enumerate(canonical_names)}
    physical = t.apply(tensors)
    want_keys = {dict(t.mapping).get(n, n) for n in canonical_names}
    assert set(physical) == want_keys
    for c, p in t.mapping:
        assert bitwise_equal(physical[p], tensors[c])
    assert_same_dict(t.invert(physical), tensors, "Rename")
    assert_same_dict(t.apply(t.invert(physical)), physical, "Rename physical")
    assert L.Rename.of(**{"a": "b"}).mapping == (("a", "b"),)


@st.composite
def concat_cases(draw):
    n = draw(st.integers(1, 4))
    sizes = tuple(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)))
    width = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([0, 1, -1]))
    return sizes, width, dim


@FAST
@given(case=concat_cases(), seed=st.integers(0, 2**16), extra=st.booleans())
def test_concat_transform_round_trip(case, seed, extra):
    sizes, width, dim = case
    sources = tuple(f"src{i}.weight" for i in range(len(sizes)))
    t = L.Concat(sources, "fused.weight", sizes, dim)
    tensors = {}
    for i, (name, s) in enumerate(zip(sources, sizes)):
        shape = [width, width]
        shape[dim] = s
        tensors[name] = rand(shape, seed + i)
    if extra:
        tensors["other"] = rand((3,), seed + 99)
    physical = t.apply(tensors)
    assert set(physical) == {"fused.weight"} | ({"other"} if extra else set())
    assert bitwise_equal(physical["fused.weight"], torch.cat([tensors[s] for s in sources], dim))
    assert_same_dict(t.invert(physical), tensors, "Concat")
    # Absent sources / target: the transform passes the dict through.
    assert_same_dict(t.apply({"x": tensors[sources[0]]}), {"x": tensors[sources[0]]})
    assert_same_dict(t.invert({"x": tensors[sources[0]]}), {"x": tensors[sources[0]]})


@FAST
@given(spec=qkv_specs(), seed=st.integers(0, 2**16))
def test_interleave_qkv_and_rows_transforms_round_trip(spec, seed):
    t = L.InterleaveQKV("q", "k", "v", "qkv", spec.num_heads, spec.num_kv_heads, spec.head_dim)
    tensors = {"q": rand((spec.q_size, 2), seed), "k": rand((spec.kv_size, 2), seed + 1),
               "v": rand((spec.kv_size, 2), seed + 2), "keep": rand((1,), seed + 3)}
    physical = t.apply(tensors)
    assert set(physical) == {"qkv", "keep"}
    assert_same_dict(t.invert(physical), tensors, "InterleaveQKV")
    r = L.InterleaveRows("q", "q2", "rows")
    pair = {"q": tensors["q"], "q2": rand(tensors["q"].shape, seed + 4)}
    assert_same_dict(r.invert(r.apply(pair)), pair, "InterleaveRows")


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), m=st.integers(1, 6), order=st.permutations(range(3)))
def test_chain_round_trip_and_order(seed, n, m, order):
    steps = [
        L.InterleaveRows("gate", "up", "gate_up"),
        L.Concat(("a", "b"), "ab", (n, m)),
        L.Rename.of(down="down_proj", norm="ln"),
    ]
    steps = tuple(steps[i] for i in order)
    chain = L.Chain(steps)
    tensors = {"gate": rand((n, 2), seed), "up": rand((n, 2), seed + 1), "a": rand((n, 3), seed + 2),
               "b": rand((m, 3), seed + 3), "down": rand((2, n), seed + 4), "norm": rand((2,), seed + 5),
               "untouched": rand((4,), seed + 6)}
    physical = chain.apply(tensors)
    sequential = dict(tensors)
    for s in steps:
        sequential = s.apply(sequential)
    assert_same_dict(physical, sequential, "Chain.apply")
    assert set(physical) == {"gate_up", "ab", "down_proj", "ln", "untouched"}
    assert_same_dict(chain.invert(physical), tensors, "Chain")
    assert_same_dict(L.Chain.of(*steps).invert(physical), tensors, "Chain.of")
    # Nested chains and the identity.
    nested = L.Chain.of(L.Chain(steps[:1]), L.Chain(steps[1:]), L.IDENTITY)
    assert_same_dict(nested.invert(nested.apply(tensors)), tensors, "nested Chain")
    assert_same_dict(L.IDENTITY.apply(tensors), tensors)
    assert_same_dict(L.IDENTITY.invert(tensors), tensors)


def test_chain_inverts_in_reverse_order():
    # Rename then concat: inverting in the same (not reversed) order would fail to find the names.
    chain = L.Chain.of(L.Rename.of(x="a", y="b"), L.Concat(("a", "b"), "ab", (1, 2)))
    tensors = {"x": rand((1,), 0), "y": rand((2,), 1)}
    physical = chain.apply(tensors)
    assert set(physical) == {"ab"}
    assert_same_dict(chain.invert(physical), tensors)


# -- bad input ------------------------------------------------------------------------------------
@FAST
@given(spec=qkv_specs(), delta=st.integers(-3, 5).filter(bool))
def test_split_qkv_wrong_row_count_names_the_numbers(spec, delta):
    expected = spec.q_size + 2 * spec.kv_size
    rows = expected + delta
    if rows <= 0:
        rows = expected + abs(delta)
    combined = torch.zeros(rows, 2)
    with pytest.raises(ValueError) as info:
        L.split_qkv(combined, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    message = str(info.value)
    numbers = set(re.findall(r"\d+", message))
    assert str(rows) in numbers and str(expected) in numbers, message
    for n in (spec.num_heads, spec.num_kv_heads, spec.head_dim):
        assert str(n) in numbers, message


@FAST
@given(a=st.lists(st.integers(1, 4), min_size=1, max_size=3), b=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_interleave_rows_rejects_mismatched_shapes(a, b):
    if a == b:
        b = [*b, 2]
    with pytest.raises(ValueError, match="interleave"):
        L.interleave_rows(torch.zeros(a), torch.zeros(b))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="3 rows"):
        L.deinterleave_rows(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"size 5 .*\[2, 2\]"):
        L.split(torch.zeros(5), [2, 2])
    t = L.Concat(("a", "b"), "ab", (1, 1))
    with pytest.raises(KeyError, match="missing b"):
        t.apply({"a": torch.zeros(1)})
    qkv = L.InterleaveQKV("q", "k", "v", "qkv", 4, 2, 2)
    with pytest.raises(ValueError, match="expected 16"):
        qkv.invert({"qkv": torch.zeros(15, 1)})


# -- the weight adapter on a tiny Llama ---------------------------------------------------------
LLAMAS = {
    # name: (tied, bias, heads, kv_heads, head_dim); transformers wants hidden % heads == 0
    "untied-gqa2": (False, False, 4, 2, 8),
    "tied-gqa7-bias": (True, True, 7, 1, 4),
    "untied-mha-bias": (False, True, 3, 3, 4),
    "tied-gqa2": (True, False, 4, 2, 4),
}
VOCAB, INTERMEDIATE, LAYERS = 48, 24, 2


def _hf_llama(tied, bias, heads, kv, head_dim, seed):
    hidden = 2 * heads
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        attention_bias=bias, mlp_bias=bias, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # every tensor random, norms and biases included, so no two rows agree
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module", params=sorted(LLAMAS))
def llama(request, tmp_path_factory):
    tied, bias, heads, kv, head_dim = LLAMAS[request.param]
    hf = _hf_llama(tied, bias, heads, kv, head_dim, seed=0)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    other = tmp_path_factory.mktemp(request.param + "-other")
    _hf_llama(tied, bias, heads, kv, head_dim, seed=1).save_pretrained(other)
    return hf, path, other, (tied, bias, heads, kv, head_dim)


def _hf_tensors(hf, tied):
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if tied:
        assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
        del sd["lm_head.weight"]  # the tied alias; transformers does not save it either
    return sd


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_hf_state_dict_is_the_transformers_state_dict(llama, backend):
    import crosschip
    from safetensors.torch import load_file

    hf, path, _, (tied, *_rest) = llama
    model = crosschip.from_pretrained(path, backend=backend)
    want = _hf_tensors(hf, tied)
    assert_same_dict(model.hf_state_dict(), want, f"{backend} hf_state_dict")
    assert set(load_file(path / "model.safetensors")) == set(want)


def _combined_checkpoint(hf_sd, tied, bias, heads, kv, head_dim):
    """The torch backend's combined format, built from Hugging Face tensors with loops."""
    out = {"model.embed_tokens.weight": hf_sd["model.embed_tokens.weight"],
           "model.norm.weight": hf_sd["model.norm.weight"]}
    if not tied:
        out["lm_head.weight"] = hf_sd["lm_head.weight"]
    params = ("weight", "bias") if bias else ("weight",)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for t in params:
            q, k, v = (hf_sd[f"{p}.self_attn.{r}_proj.{t}"] for r in "qkv")
            out[f"{p}.self_attn.qkv_proj.{t}"] = combined_qkv_by_loops(q, k, v, heads, kv, head_dim)
            out[f"{p}.self_attn.o_proj.{t}"] = hf_sd[f"{p}.self_attn.o_proj.{t}"]
            out[f"{p}.mlp.gate_up_proj.{t}"] = interleaved_by_loops(hf_sd[f"{p}.mlp.gate_proj.{t}"],
                                                                  hf_sd[f"{p}.mlp.up_proj.{t}"])
            out[f"{p}.mlp.down_proj.{t}"] = hf_sd[f"{p}.mlp.down_proj.{t}"]
        out[f"{p}.input_layernorm.weight"] = hf_sd[f"{p}.input_layernorm.weight"]
        out[f"{p}.post_attention_layernorm.weight"] = hf_sd[f"{p}.post_attention_layernorm.weight"]
    return out


def test_torch_native_state_dict_is_the_combined_format(llama):
    import crosschip

    hf, path, _, (tied, bias, heads, kv, head_dim) = llama
    model = crosschip.from_pretrained(path, backend="torch")
    native = dict(model.state_dict())
    want = _combined_checkpoint(_hf_tensors(hf, tied), tied, bias, heads, kv, head_dim)
    assert sorted(native) == sorted(want)
    assert_same_dict(native, want, "torch native state_dict")


def _logits(model, seed=0):
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_torch_native_state_dict_interchangeable_with_combined_checkpoint(llama, tmp_path):
    import crosschip
    from safetensors.torch import load_file, save_file

    hf, path, other, (tied, bias, heads, kv, head_dim) = llama
    model = crosschip.from_pretrained(path, backend="torch")
    logits = _logits(model)
    assert_rel_close(logits, _logits(hf), 1e-5, "torch vs transformers logits")

    # A native state dict, saved as safetensors, loads strictly into a fresh model.
    save_file(dict(model.state_dict()), str(tmp_path / "native.safetensors"))
    fresh = crosschip.from_pretrained(other, backend="torch")
    assert not torch.equal(_logits(fresh), logits)
    fresh.load_state_dict(load_file(str(tmp_path / "native.safetensors")), strict=True)
    assert torch.equal(_logits(fresh), logits)
    assert_same_dict(fresh.hf_state_dict(), _hf_tensors(hf, tied), "after native load")

    # So does a combined checkpoint built independently from the Hugging Face tensors.
    combined = _combined_checkpoint(_hf_tensors(hf, tied), tied, bias, heads, kv, head_dim)
    save_file({k: v.contiguous() for k, v in combined.items()}, str(tmp_path / "combined.safetensors"))
    fresh2 = crosschip.from_pretrained(other, backend="torch")
    fresh2.load_state_dict(load_file(str(tmp_path / "combined.safetensors")), strict=True)
    assert torch.equal(_logits(fresh2), logits)


def test_sharded_load_follows_row_permutations_and_refuses_value_changes():
    """The streaming sharded load pushes row ids through a component's transforms: a row
    permutation gives each physical row's checkpoint row; a transform that changes values while
    keeping the shape yields ids that name no row, and the load reads whole tensors instead."""
    from crosschip.checkpoint.sharded_load import row_sources

    class Binding:
        hf_shapes = {"a.weight": (4, 3), "b.weight": (2, 3)}

        def __init__(self, transform):
            self.from_hf = transform

    permuted = row_sources(Binding(lambda t: {"w": torch.cat([t["b.weight"], t["a.weight"].flip(0)])}))
    assert permuted["w"].tolist() == [(1 << 32) + 0, (1 << 32) + 1, 3, 2, 1, 0]
    assert row_sources(Binding(lambda t: {"w": t["a.weight"] * 3})) is None
    assert row_sources(Binding(lambda t: {"w": t["a.weight"].float()})) is None
