"""GPU tests (marked ``cuda``): the torch backend on CUDA, and the te backend against the
reference with tolerances derived from the reference's own bf16-vs-fp32 error."""

from __future__ import annotations


import pytest
import torch

import crosschip
from helpers import norm_rel
from zoo import save_hf, zoo_configs

pytestmark = pytest.mark.cuda
CONFIGS = zoo_configs()


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32: float32 parity means float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.float(), out.loss.float(), model.hf_grads()


@pytest.mark.parametrize("name", ["llama3.2_tied", "qwen2_bias_gqa1", "phi3_fused"])
def test_torch_backend_on_cuda_matches_transformers(tmp_path, name):
    config, _ = CONFIGS[name]
    hf = save_hf(tmp_path, config).cuda()
    ids = torch.randint(1, config.vocab_size, (2, 40), device="cuda")
    expected = hf(ids, labels=ids)
    expected.loss.backward()
    model = crosschip.from_pretrained(tmp_path, backend="torch", device="cuda")
    logits, loss, grads = _run(model, ids)
    assert norm_rel(logits, expected.logits) < 1e-5
    assert norm_rel(loss, expected.loss) < 1e-5
    for key, p in hf.named_parameters():
        assert norm_rel(grads[key], p.grad) < 1e-4, key


def test_torch_backend_compiles_on_cuda(tmp_path):
    config, _ = CONFIGS["qwen3_qknorm_headdim"]
    save_hf(tmp_path, config)
    model = crosschip.from_pretrained(tmp_path, backend="torch", device="cuda", dtype="bf16")
    ids = torch.randint(1, config.vocab_size, (2, 64), device="cuda")
    eager = model(ids).logits
    compiled = torch.compile(model)
    out = compiled(ids, labels=ids)
    assert norm_rel(out.logits, eager) < 1e-2
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


needs_te = pytest.mark.usefixtures("te_installed")

# Sizes TE kernels accept (hidden and head_dim multiples of 16 / 8) with each model's features.
TE_CONFIGS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral_sliding": ("MistralConfig", dict(sliding_window=16)),
    "qwen2_bias": ("Qwen2Config", dict()),
    "qwen3_qknorm": ("Qwen3Config", dict(head_dim=32)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.03125, logits_scaling=8.0)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
}


def _te_config(name):
    import transformers

    cls_name, extra = TE_CONFIGS[name]
    kwargs = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(extra)
    return getattr(transformers, cls_name)(**kwargs)


@needs_te
@pytest.mark.parametrize("name", list(TE_CONFIGS))
def test_te_bf16_matches_reference_within_its_own_bf16_error(tmp_path, name):
    save_hf(tmp_path, _te_config(name))
    ids = torch.randint(1, 256, (2, 64), device="cuda")
    ref32 = _run(crosschip.from_pretrained(tmp_path, backend="reference", device="cuda"), ids)
    ref16 = _run(crosschip.from_pretrained(tmp_path, backend="reference", device="cuda", dtype="bf16"), ids)
    te_model = crosschip.from_pretrained(tmp_path, backend="te", device="cuda", dtype="bf16", strict=True)
    for component in ("qkv_projection", "gated_mlp", "out_projection", "attention", "rotary", "loss"):
        assert te_model.runtime.report.backends_for(component) == {"te"}, component
    te16 = _run(te_model, ids)
    # The reference's own bf16 rounding error sets the scale; TE's kernels may round in another
    # order, so allow a small multiple of it (and never less than one bf16 ulp of headroom).
    for what, i in (("logits", 0), ("loss", 1)):
        budget = 3 * norm_rel(ref16[i], ref32[i]) + 4e-3
        assert norm_rel(te16[i], ref32[i]) <= budget, what
    for key, g32 in ref32[2].items():
        budget = 3 * norm_rel(ref16[2][key], g32) + 4e-3
        assert norm_rel(te16[2][key], g32) <= budget, key


@needs_te
def test_mixed_te_projections_with_reference_attention(tmp_path):
    save_hf(tmp_path, _te_config("llama"))
    ids = torch.randint(1, 256, (2, 32), device="cuda")
    ref = crosschip.from_pretrained(tmp_path, backend="reference", device="cuda", dtype="bf16")(ids).logits
    mixed = crosschip.from_pretrained(tmp_path, backend="te", components={"attention": "reference"},
                                      device="cuda", dtype="bf16")
    assert mixed.runtime.report.backends_for("attention") == {"reference"}
    assert mixed.runtime.report.backends_for("qkv_projection") == {"te"}
    assert norm_rel(mixed(ids).logits, ref) < 2e-2


@needs_te
def test_te_checkpoint_portability(tmp_path):
    save_hf(tmp_path / "in", _te_config("qwen2_bias"))
    ids = torch.randint(1, 256, (2, 32), device="cuda")
    te_model = crosschip.from_pretrained(tmp_path / "in", backend="te", device="cuda")
    state = te_model.state_dict()
    assert any(k.endswith("_extra_state") for k in state), "TE extra state is part of the native state dict"
    assert "model.layers.0.self_attn.qkv_proj.proj.layer_norm_weight" in state
    te_model.save_pretrained(tmp_path / "from_te")
    for backend in ("reference", "torch"):
        other = crosschip.from_pretrained(tmp_path / "from_te", backend=backend, device="cuda")
        for key, tensor in other.hf_state_dict().items():
            assert torch.equal(tensor, te_model.hf_state_dict()[key]), key
        # The weights are bitwise equal; TE's float32 GEMMs run on TF32 tensor cores (unit
        # roundoff 2**-11, measured 5.7e-4 here), so float32 logits agree to a few TF32 roundings.
        assert norm_rel(other(ids).logits, te_model(ids).logits) < 4 * 2**-11
    crosschip.from_pretrained(tmp_path / "in", backend="torch", device="cuda").save_pretrained(tmp_path / "from_torch")
    back = crosschip.from_pretrained(tmp_path / "from_torch", backend="te", device="cuda")
    assert norm_rel(back(ids).logits, te_model(ids).logits) < 1e-5


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_training_tracks_bf16(tmp_path, recipe):
    from crosschip.training.train import TrainArgs, train

    common = dict(steps=300, batch_size=16, seq_len=128, lr=2e-3, backend="te", device="cuda", dtype="bf16", seed=0)
    bf16 = train(TrainArgs(out=str(tmp_path / "bf16"), **common), progress=False)
    fp8 = train(TrainArgs(out=str(tmp_path / "fp8"), precision="fp8", fp8_recipe=recipe, **common), progress=False)
    assert fp8.model.runtime.report.backends_for("qkv_projection") == {"te"}
    tail_bf16 = sum(bf16.losses[-30:]) / 30
    tail_fp8 = sum(fp8.losses[-30:]) / 30
    assert bf16.losses[0] - tail_bf16 > 2.0  # it learned
    assert abs(tail_fp8 - tail_bf16) <= 0.05 * tail_bf16, (tail_fp8, tail_bf16)


@needs_te
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_te_conforms_on_cuda(dtype):
    """Every te component against the reference through the conformance kit (outputs and input
    and weight gradients), including the fused RoPE on shared and per-sequence positions and the
    fused loss from logits it makes itself and from logits handed in."""
    from crosschip.testing import conformance

    exact = ("rms_norm", "rotary", "loss")
    report = conformance.check_backend("te", exact, device="cuda", dtype=dtype)
    # TE runs float32 GEMMs on TF32 tensor cores (unit roundoff 2**-11) whatever torch's flags.
    gemms = conformance.check_backend("te", ("qkv_projection", "out_projection", "gated_mlp"), device="cuda",
                                      dtype=dtype, tolerance=4 * 2**-11 if dtype == torch.float32 else None)
    ran = {(o.case.component, o.case.label) for o in report.passed + gemms.passed if o.case is not None}
    assert {("rotary", "default"), ("rotary", "shared-positions"), ("rotary", "partial")} <= ran, str(report)
    assert {c for c, _ in ran} >= {"rotary", "loss", "qkv_projection", "gated_mlp", "rms_norm"}, str(report)


@needs_te
def test_te_fused_rope_is_as_accurate_as_the_reference_at_long_positions():
    """TE's kernel computes sin and cos in float32 from the angles and rounds once; held against
    float64 at positions up to 8191 it must be no worse than the reference formula at the same
    dtype (whose bf16 tables round cos and sin to bf16)."""
    from crosschip.reference.components import Rotary as ReferenceRotary
    from crosschip.modeling.rope import RopeTables, apply_rotary, rope_inverse_frequencies
    from crosschip.specs import RopeSpec
    from crosschip_te.rotary import RopeAngles, Rotary

    spec = RopeSpec(128, 8192, (("rope_theta", 500000.0), ("rope_type", "default")))
    fused_rope, reference_rope = Rotary(spec, None).cuda(), ReferenceRotary(spec).cuda()
    positions = torch.arange(8192, device="cuda").unsqueeze(0)
    q = torch.randn(1, 8192, 4, 128, device="cuda", dtype=torch.float64)
    k = torch.randn(1, 8192, 2, 128, device="cuda", dtype=torch.float64)
    inv_freq, _ = rope_inverse_frequencies(spec, "cuda")
    angles = positions[..., None].double() * inv_freq.double()
    angles = torch.cat((angles, angles), dim=-1)
    exact = apply_rotary(q, k, RopeTables(angles.cos(), angles.sin()))
    for dtype in (torch.bfloat16, torch.float32):
        tables = fused_rope(positions, dtype)
        assert isinstance(tables, RopeAngles)
        fused = fused_rope.apply(q.to(dtype), k.to(dtype), tables)
        reference = reference_rope.apply(q.to(dtype), k.to(dtype), reference_rope(positions, dtype))
        for got, ref, want in zip(fused, reference, exact):
            err, ref_err = norm_rel(got.double(), want), norm_rel(ref.double(), want)
            print(f"{dtype}: fused RoPE error {err:.3g}, reference {ref_err:.3g}")
            # float32 angles at position 8191 are off by ~5e-4 rad on both sides: the bound is
            # the reference's own error, not a float32 ulp.
            assert err <= 1.05 * ref_err, (dtype, err, ref_err)


@needs_te
def test_te_probe_reads_the_capability_without_initialising_cuda():
    """In a fresh interpreter the probe finds this GPU's compute capability through NVML and
    leaves CUDA uninitialised; the kit's descriptor check does the same from a process where
    CUDA is already up."""
    import subprocess
    import sys

    from crosschip.testing import conformance

    code = ("import torch; from crosschip_te.plugin import probe; p = probe(); "
            "print(p.available, torch.cuda.is_initialized(), p.reason)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    major, minor = torch.cuda.get_device_capability()
    assert out.startswith("True False "), out
    assert f"compute capability {major}.{minor}" in out, out
    torch.zeros(1, device="cuda")
    conformance.check_descriptor("te")


@needs_te
def test_te_builds_on_meta_and_refuses_a_model_too_big_before_allocating():
    """Inside the model build (meta device) TE defers allocation, so the memory check sees the
    weights first: layers far beyond this GPU are refused with the sizes, nothing allocated.
    Allocated later, TE's deferred initialisation gives each parameter its TP attributes."""
    import transformers

    from crosschip.errors import ConfigurationError
    from crosschip.checkpoint.loading import build_model
    from crosschip.models import model_class
    from crosschip.runtime import Runtime
    from crosschip.specs import NormSpec, QKVSpec

    runtime = Runtime("te", device="cuda", dtype="bf16", strict=True)
    with torch.device("meta"):
        qkv = runtime.qkv_projection(QKVSpec(256, 8, 2, 32, input_norm=NormSpec(256)))
    assert all(p.is_meta for p in qkv.parameters())
    qkv.to_empty(device="cuda")
    qkv.reset_buffers()
    assert qkv.proj.weight.is_cuda and qkv.proj.weight.partition_dim == 0
    assert qkv.proj.layer_norm_weight.sequence_parallel is False and torch.all(qkv.proj.layer_norm_weight == 1)

    # About 400 GiB of bf16 MLP weights: beyond any single GPU.
    huge = transformers.LlamaConfig(vocab_size=256, hidden_size=8192, intermediate_size=1 << 20,
                                    num_hidden_layers=8, num_attention_heads=64, num_key_value_heads=8,
                                    architectures=["LlamaForCausalLM"])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(ConfigurationError, match=r"weights alone need .* GiB .* refusing to allocate"):
        build_model(model_class("LlamaForCausalLM"), huge, runtime)
    assert torch.cuda.memory_allocated() == before


@needs_te
def test_te_packed_rows_keep_each_document_as_alone(tmp_path):
    """A packed row on te (bf16): its masked attention path keeps every document's logits those
    of the document alone (which takes TE's fused kernels), within twice the reference's own bf16
    error against float32."""
    save_hf(tmp_path, _te_config("llama"))
    te_model = crosschip.from_pretrained(tmp_path, backend="te", device="cuda", dtype="bf16", strict=True)
    ref32 = crosschip.from_pretrained(tmp_path, backend="reference", device="cuda")
    docs = [torch.randint(1, 256, (n,), device="cuda") for n in (24, 40)]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d), device="cuda") for d in docs])[None]
    documents = torch.cat([torch.full((len(d),), i, device="cuda") for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = te_model(row, position_ids=positions, document_ids=documents).logits.float()
        alone32 = torch.cat([ref32(d[None]).logits for d in docs], dim=1)
        alone16 = torch.cat([te_model(d[None]).logits.float() for d in docs], dim=1)
    assert norm_rel(packed, alone32) <= 2 * norm_rel(alone16, alone32) + 4e-3


# -- te's newer kinds: layer_norm, mlp, linear, Gemma's offset norms, LayerNorm input norms -------
def _te_new_kind_cases():
    from crosschip.specs import GatedMLPSpec, LayerNormSpec, MLPSpec, NormSpec, QKVSpec
    from crosschip.testing import conformance
    from crosschip.testing.conformance import Case

    extra = [  # beyond the kinds' own cases: each TE activation, norm and offset once
        Case("mlp", MLPSpec(32, 64, "relu", input_norm=NormSpec(32)), "relu-rms"),
        Case("mlp", MLPSpec(32, 64, "quick_gelu", bias=False, input_norm=NormSpec(32, 1e-6, offset=1.0)),
             "quick-gelu-offset"),
        Case("mlp", MLPSpec(32, 48, "relu2", input_norm=LayerNormSpec(32)), "relu2-layer-norm"),
        Case("mlp", MLPSpec(32, 64, "gelu", input_norm=NormSpec(32)), "erf-gelu"),
        Case("gated_mlp", GatedMLPSpec(32, 64, "gelu_pytorch_tanh", bias=True, input_norm=LayerNormSpec(32)),
             "geglu-layer-norm"),
        Case("gated_mlp", GatedMLPSpec(32, 64, input_norm=NormSpec(32, 1e-6, offset=1.0)), "swiglu-offset"),
        Case("qkv_projection", QKVSpec(32, 4, 2, 8, bias=True, input_norm=LayerNormSpec(32)), "layer-norm-input"),
        Case("qkv_projection", QKVSpec(32, 4, 2, 8, input_norm=NormSpec(32, 1e-6, offset=1.0)), "offset-input"),
    ]
    norms = conformance.cases("te", ("layer_norm", "rms_norm"))
    gemms = conformance.cases("te", ("mlp", "linear")) + extra
    return norms, gemms


@needs_te
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_te_new_kinds_conform_on_cuda(dtype):
    """layer_norm, Gemma's offset RMSNorm, the non-gated LayerNormMLP, the general linear and
    LayerNorm / offset input norms fused into QKV and MLPs, against the reference (outputs, input
    and weight gradients, layouts); what TE cannot compute is declined with its reason."""
    from crosschip.testing import conformance

    norms, gemms = _te_new_kind_cases()
    report = conformance.check_backend("te", device="cuda", dtype=dtype, case_list=norms)
    # TE runs float32 GEMMs on TF32 tensor cores (unit roundoff 2**-11) whatever torch's flags.
    tolerance = 4 * 2**-11 if dtype == torch.float32 else None
    fused = conformance.check_backend("te", device="cuda", dtype=dtype, tolerance=tolerance, case_list=gemms)
    ran = {(o.case.component, o.case.label) for o in report.passed + fused.passed if o.case is not None}
    print(report, fused, sep="\n")
    assert {("layer_norm", "bias"), ("layer_norm", "head-dim"), ("rms_norm", "offset"),
            ("mlp", "layer-norm-input"), ("mlp", "relu-rms"), ("mlp", "quick-gelu-offset"),
            ("mlp", "relu2-layer-norm"), ("gated_mlp", "geglu-layer-norm"), ("gated_mlp", "swiglu-offset"),
            ("qkv_projection", "layer-norm-input"), ("qkv_projection", "offset-input"),
            ("linear", "column-bias"), ("linear", "row"), ("linear", "replicated")} <= ran, str(fused)
    declined = {(o.case.component, o.case.label): o.detail for o in report.declined + fused.declined}
    assert "always holds and adds a learned bias" in declined[("layer_norm", "no-bias")]
    assert "scope='projection'" in declined[("rms_norm", "projection")]
    assert "exact (erf) GELU" in declined[("mlp", "erf-gelu")]
    assert "needs an input norm" in declined[("mlp", "gelu-bias")]


@needs_te
def test_te_gelu_is_the_tanh_approximation():
    """Why transformers' "gelu" (erf) is declined and gelu_pytorch_tanh maps to TE's "gelu":
    with fc1 = 3 I and fc2 = I, TE's LayerNormMLP output is act(3 * rmsnorm(x)) elementwise. In
    the negative tail, where erf and tanh GELU differ by several percent, it is the tanh form to
    TF32 rounding and not the erf form."""
    import torch.nn.functional as F

    from crosschip.runtime import Runtime
    from crosschip.specs import MLPSpec, NormSpec

    rt = Runtime("te", device="cuda", dtype="float32", strict=True)
    mlp = rt.mlp(MLPSpec(64, 64, "gelu_pytorch_tanh", bias=False, input_norm=NormSpec(64, 1e-6)))
    assert mlp.crosschip_component.backend == "te" and mlp.mlp.activation == "gelu"
    with torch.no_grad():
        mlp.mlp.fc1_weight.copy_(3 * torch.eye(64))
        mlp.mlp.fc2_weight.copy_(torch.eye(64))
        mlp.mlp.layer_norm_weight.fill_(1.0)
        x = torch.randn(4, 16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        out = mlp(x)
    h = 3 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    tail = (h < -2.5) & (h > -4.0)
    assert tail.sum() > 50
    # Mean relative error over the tail: TF32 rounding of fc1's input moves h by ~5e-4
    # relative, which the steep tail amplifies to ~1% at -4; erf and tanh GELU differ there
    # by 3% (at -2.5) to 40% (at -4).
    rel = lambda want: ((out - want).abs() / want.abs())[tail].mean().item()
    tanh_err, erf_err = rel(F.gelu(h, approximate="tanh")), rel(F.gelu(h))
    print(f"TE gelu vs tanh GELU {tanh_err:.2e}, vs erf GELU {erf_err:.2e}")
    assert tanh_err < 0.1 * erf_err and erf_err > 5e-2, (tanh_err, erf_err)


@needs_te
def test_te_new_kinds_build_on_meta_with_their_parameters():
    """The model build's meta path: TE defers allocation of LayerNorm and LayerNormMLP and
    initialises them after to_empty (a LayerNorm's bias included; zero_centered_gamma starts at 0)."""
    from crosschip.runtime import Runtime
    from crosschip.specs import LayerNormSpec, MLPSpec, NormSpec

    rt = Runtime("te", device="cuda", dtype="bf16", strict=True)
    with torch.device("meta"):
        norm = rt.layer_norm(LayerNormSpec(64))
        gemma = rt.rms_norm(NormSpec(64, offset=1.0))
        mlp = rt.mlp(MLPSpec(64, 128, "gelu_new", input_norm=LayerNormSpec(64)))
    for module in (norm, gemma, mlp):
        assert all(p.is_meta for p in module.parameters())
        module.to_empty(device="cuda")
        module.reset_buffers()
    assert torch.all(norm.norm.weight == 1) and torch.all(norm.norm.bias == 0)
    assert gemma.norm.zero_centered_gamma and torch.all(gemma.norm.weight == 0)
    assert mlp.mlp.layer_norm_bias.is_cuda and mlp.mlp.normalization == "LayerNorm"


# The families of the open component set and the mixtures of experts, at sizes TE takes.
NEW_FAMILY_CONFIGS = {
    "olmo2": ("Olmo2Config", dict()),
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"])),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0], pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(layer_norm_eps=1e-5, hidden_act="gelu_new")),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, moe_intermediate_size=128, num_experts=8,
                                         num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
}


@needs_te
@pytest.mark.parametrize("name", list(NEW_FAMILY_CONFIGS))
def test_te_bf16_new_families_within_the_references_bf16_error(tmp_path, name):
    """Each new family on te in bf16 (te builds what TE can; torch, its declared fallback, the rest,
    strictly: nothing ends on the reference), against the reference in float32, within a small
    multiple of the reference's own bf16 error."""
    import transformers

    cls_name, extra = NEW_FAMILY_CONFIGS[name]
    kwargs = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(extra)
    if cls_name == "GPTNeoXConfig":
        kwargs.pop("num_key_value_heads"), kwargs.pop("rms_norm_eps")
    save_hf(tmp_path, getattr(transformers, cls_name)(**kwargs))
    ids = torch.randint(1, 256, (2, 64), device="cuda")
    ref32 = _run(crosschip.from_pretrained(tmp_path, backend="reference", device="cuda"), ids)
    ref16 = _run(crosschip.from_pretrained(tmp_path, backend="reference", device="cuda", dtype="bf16"), ids)
    te_model = crosschip.from_pretrained(tmp_path, backend="te", device="cuda", dtype="bf16", strict=True)
    assert "te" in te_model.runtime.report.backends_for("qkv_projection")
    te16 = _run(te_model, ids)
    for what, i in (("logits", 0), ("loss", 1)):
        budget = 3 * norm_rel(ref16[i], ref32[i]) + 4e-3
        assert norm_rel(te16[i], ref32[i]) <= budget, what
    for key, g32 in ref32[2].items():
        if ".experts." in key:
            # A token whose top-k choice is near a tie flips under bf16 rounding, and an expert's
            # gradient then differs by the tokens it gained or lost (seen: OLMoE, one expert at
            # 0.24 relative). Expert gradients are checked in float32 against transformers
            # (test_moe_families) and the grouped bf16 path against the reference on fixed
            # routing (test_moe_kind); logits and loss above still cover the experts' outputs.
            continue
        budget = 3 * norm_rel(ref16[2][key], g32) + 4e-3
        assert norm_rel(te16[2][key], g32) <= budget, key
