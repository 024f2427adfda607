"""Hook implementations of the ``torch`` backend (entry point ``crosschip.backends: torch``)."""

from __future__ import annotations

from crosschip import BackendDescriptor, ComponentImpl, LayoutImpl, Probe, hookimpl
from crosschip.parallel.distributed import check_gated_mlp, check_linear

NAME = "torch"
_MOD = "crosschip_torch.components"
_LAYOUT = "crosschip_torch.layout"


def probe() -> Probe:
    # Plain torch: available wherever torch imports; CUDA is used when the runtime asks for it.
    return Probe(True, "plain torch (CPU and CUDA)")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(
        name=NAME,
        priority=100,
        device_types=("cpu", "cuda"),
        probe=probe,
        description="combined QKV / gate_up projections, SDPA attention, vocab-parallel embedding, "
                    "LM head and loss, DTensor parallelism",
    )]


@hookimpl
def crosschip_register_components():
    return [
        ComponentImpl(NAME, "qkv_projection", _qkv_projection),
        ComponentImpl(NAME, "gated_mlp", _gated_mlp),
        ComponentImpl(NAME, "out_projection", _out_projection),
        ComponentImpl(NAME, "linear", _linear),
        ComponentImpl(NAME, "mlp", _mlp),
        ComponentImpl(NAME, "moe", "crosschip_torch.moe:GroupedExperts"),
        ComponentImpl(NAME, "attention", _attention, handles=("softcap",)),
        ComponentImpl(NAME, "rms_norm", lambda spec, ctx: _cls("RMSNorm")(spec), handles=("offset",)),
        ComponentImpl(NAME, "layer_norm", lambda spec, ctx: _cls("LayerNorm")(spec)),
        ComponentImpl(NAME, "embedding", lambda spec, ctx: _cls("Embedding")(spec)),
        ComponentImpl(NAME, "lm_head", lambda spec, ctx: _cls("LMHead")(spec), handles=("softcap",)),
        ComponentImpl(NAME, "loss", lambda spec, ctx: _cls("CausalLMLoss")(spec)),
    ]


@hookimpl
def crosschip_register_layouts():
    return [
        LayoutImpl(NAME, "qkv_projection", f"{_LAYOUT}:qkv_layout"),
        LayoutImpl(NAME, "gated_mlp", f"{_LAYOUT}:gated_mlp_layout"),
        LayoutImpl(NAME, "mlp", f"{_LAYOUT}:mlp_layout"),
        LayoutImpl(NAME, "moe", "crosschip_torch.moe:moe_layout"),
        LayoutImpl(NAME, "out_projection", f"{_LAYOUT}:identity_layout"),
        LayoutImpl(NAME, "linear", f"{_LAYOUT}:identity_layout"),
        LayoutImpl(NAME, "rms_norm", f"{_LAYOUT}:identity_layout"),
        LayoutImpl(NAME, "layer_norm", f"{_LAYOUT}:identity_layout"),
        LayoutImpl(NAME, "embedding", f"{_LAYOUT}:identity_layout"),
        LayoutImpl(NAME, "lm_head", f"{_LAYOUT}:identity_layout"),
    ]


@hookimpl
def crosschip_validate_runtime(runtime):
    if runtime.parallel.size > 1:  # the parallel module is imported only when it is needed
        _parallel().check_runtime(runtime)


@hookimpl
def crosschip_parallelize_model(model, runtime):
    return _parallel().parallelize(model, runtime)


@hookimpl
def crosschip_finalize_model(model, runtime):
    if runtime.parallel.size > 1 and runtime.plan_owner == NAME:
        _parallel().attach_training_hooks(model)


@hookimpl
def crosschip_environment_info():
    import torch

    return {"torch": torch.__version__, "cuda": str(torch.cuda.is_available())}


# Factories build the full (unsharded) module, with KV heads replicated when the TP degree
# exceeds them; the parallel plan shards it after the weights are loaded.
def _qkv_projection(spec, ctx):
    from crosschip.parallel.kv_replication import physical_qkv_spec

    return _cls("CombinedQKV")(physical_qkv_spec(spec, _tp(ctx)))


def _gated_mlp(spec, ctx):
    check_gated_mlp(spec, _tp(ctx))
    return _cls("GatedMLP")(spec)


def _out_projection(spec, ctx):
    check_linear(spec, _tp(ctx))
    return _cls("Linear")(spec)


def _linear(spec, ctx):
    check_linear(spec, _tp(ctx))
    return _cls("Linear")(spec)


def _mlp(spec, ctx):
    check_gated_mlp(spec, _tp(ctx))  # the same split: intermediate features over the ranks
    return _cls("MLP")(spec)


def _attention(spec, ctx):
    return _cls("SoftcappedAttention" if spec.softcap is not None else "SDPAAttention")(spec)


def _tp(ctx) -> int:
    return ctx.parallel.tp if ctx is not None else 1


def _parallel():
    import importlib

    return importlib.import_module("crosschip_torch.parallel")


def _cls(name: str):
    import importlib

    return getattr(importlib.import_module(_MOD), name)
