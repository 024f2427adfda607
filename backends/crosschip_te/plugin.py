"""Hook implementations of the ``te`` backend. Registration and the availability probe are cheap:
nothing here imports transformer_engine or initialises CUDA."""

from __future__ import annotations

import importlib.util

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl
from crosschip.errors import ConfigurationError

NAME = "te"
_C = "crosschip_te.components"
_S = "crosschip_te.support"
_L = "crosschip_te.layout"

#: Why te leaves mixtures of experts to its fallback (the torch backend's grouped GEMMs).
MOE_DECLINE = ("Transformer Engine's GroupedLinear takes the tokens per expert as a host list "
               "(m_splits: List[int]), a device-to-host synchronisation in every MoE layer, and keeps one "
               "weight per expert; the torch backend's grouped_mm experts need neither")


def probe() -> Probe:
    if importlib.util.find_spec("transformer_engine") is None:
        return Probe(False, "transformer_engine is not installed (pip install 'crosschip[te]' on a CUDA machine)")
    import torch

    from crosschip_te.capability import unsupported_reason, visible_capabilities

    # device_count() asks the driver (NVML where present) without creating a CUDA context.
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return Probe(False, "no CUDA device visible to torch")
    capabilities = visible_capabilities()
    if capabilities is None:
        return Probe(True, f"transformer_engine importable, {torch.cuda.device_count()} CUDA device(s) "
                           "(compute capability not checked: NVML unavailable)")
    reason = unsupported_reason(capabilities)
    if reason is not None:
        return Probe(False, reason)
    listed = ", ".join(f"{major}.{minor}" for major, minor in capabilities)
    return Probe(True, f"transformer_engine importable, {len(capabilities)} CUDA device(s) of compute "
                       f"capability {listed}")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=200,
        device_types=("cuda",),
        probe=probe,
        fallbacks=("torch",),
        precisions=("fp8",),
        description="Transformer Engine: RMSNorm / LayerNorm fused into QKV and MLP, fused attention, FP8",
        declined_kinds={"moe": MOE_DECLINE},
    )]


def _factory(cls: str, module: str = _C):
    def build(spec, ctx):
        import importlib

        return getattr(importlib.import_module(module), cls)(spec, ctx)

    return build


#: The fused input norms TE's LayerNormLinear / LayerNormMLP compute: a LayerNorm (with bias), and
#: an RMSNorm with Gemma's offset (zero_centered_gamma); support.py declines the rest.
_FUSED_NORMS = ("input_norm=LayerNormSpec", "input_norm.offset")


@hookimpl
def crosschip_register_components():
    return [
        ComponentImpl(NAME, "qkv_projection", _factory("QKVProjection"), f"{_S}:qkv", fuses_input_norm=True,
                      handles=_FUSED_NORMS),
        ComponentImpl(NAME, "gated_mlp", _factory("GatedMLP"), f"{_S}:gated_mlp", fuses_input_norm=True,
                      handles=_FUSED_NORMS),
        ComponentImpl(NAME, "mlp", _factory("MLP"), f"{_S}:mlp", fuses_input_norm=True, handles=_FUSED_NORMS),
        ComponentImpl(NAME, "out_projection", _factory("Linear"), f"{_S}:linear"),
        ComponentImpl(NAME, "linear", _factory("Linear"), f"{_S}:general_linear"),
        ComponentImpl(NAME, "rms_norm", _factory("RMSNorm"), f"{_S}:rms_norm", handles=("offset",)),
        ComponentImpl(NAME, "layer_norm", _factory("LayerNorm"), f"{_S}:layer_norm"),
        # softcap "handled" by support.attention declining it with TE's own reason.
        ComponentImpl(NAME, "attention", _factory("DotProductAttention"), f"{_S}:attention", handles=("softcap",)),
        ComponentImpl(NAME, "rotary", _factory("Rotary", "crosschip_te.rotary"), f"{_S}:rotary"),
        ComponentImpl(NAME, "loss", _factory("CausalLMLoss", "crosschip_te.loss"), f"{_S}:loss"),
    ]


@hookimpl
def crosschip_register_layouts():
    return [
        LayoutImpl(NAME, "qkv_projection", f"{_L}:qkv_layout"),
        LayoutImpl(NAME, "gated_mlp", f"{_L}:gated_mlp_layout"),
        LayoutImpl(NAME, "mlp", f"{_L}:mlp_layout"),
        LayoutImpl(NAME, "out_projection", f"{_L}:linear_layout"),
        LayoutImpl(NAME, "linear", f"{_L}:linear_layout"),
        LayoutImpl(NAME, "rms_norm", f"{_L}:rms_norm_layout"),
        LayoutImpl(NAME, "layer_norm", f"{_L}:layer_norm_layout"),
    ]


def _recipe(name: str):
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    if name == "current":
        return recipe.Float8CurrentScaling()
    if name == "block":
        return recipe.Float8BlockScaling()
    return recipe.MXFP8BlockScaling()


@hookimpl
def crosschip_validate_runtime(runtime):
    if runtime.precision != "fp8" or not probe().available:
        return
    import transformer_engine.pytorch as te

    check = {"block": te.is_fp8_block_scaling_available, "mxfp8": te.is_mxfp8_available}.get(
        runtime.fp8_recipe, te.is_fp8_available)
    ok, reason = check(return_reason=True)
    if not ok:
        raise ConfigurationError(f"precision='fp8' with fp8_recipe={runtime.fp8_recipe!r} is not available "
                                 f"on this GPU: {reason}")


@hookimpl
def crosschip_autocast(runtime):
    if runtime.precision != "fp8":
        return None
    import transformer_engine.pytorch as te

    recipe = _recipe(runtime.fp8_recipe)
    # Under tensor parallelism, FP8 scaling factors are agreed over the TP group (amaxes reduced
    # at the end of each step), so ranks holding the same tensor quantize it alike.
    mesh = runtime.device_mesh
    from crosschip.parallel.distributed import TP_DIM

    group = mesh.get_group(TP_DIM) if mesh is not None and TP_DIM in (mesh.mesh_dim_names or ()) else None
    return lambda: te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)


@hookimpl
def crosschip_parallelize_model(model, runtime):
    return _parallel().parallelize(model, runtime)


@hookimpl
def crosschip_finalize_model(model, runtime):
    # Only for the plan this plugin applied: another owner reduces per-head norms its own way.
    if runtime.parallel.tp > 1 and runtime.plan_owner == NAME:
        _parallel().attach_training_hooks(model, runtime)


def _parallel():
    import importlib

    return importlib.import_module("crosschip_te.parallel")


@hookimpl
def crosschip_checkpoint_function(runtime):
    import transformer_engine.pytorch as te

    return te.checkpoint


@hookimpl
def crosschip_graph_function(runtime):
    # Transformer Engine's recorder: it records under FP8 autocast with the run's recipe and
    # updates the FP8 scaling factors at replay, which torch's does not know about.
    import transformer_engine.pytorch as te

    fp8 = runtime.precision == "fp8"
    recipe = _recipe(runtime.fp8_recipe) if fp8 else None

    def record(modules, sample_args, grads_consumed: bool):
        return te.make_graphed_callables(modules, sample_args, enabled=fp8, recipe=recipe,
                                         clone_param_grads_on_return=not grads_consumed)

    return record


@hookimpl
def crosschip_environment_info():
    spec = importlib.util.find_spec("transformer_engine")
    return {"transformer_engine": "installed" if spec else "not installed"}
