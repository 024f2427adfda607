"""Hook specifications of the ``crosschip`` pluggy project.

A plugin is a module (named by an entry point in the ``crosschip.backends`` group) holding
functions decorated with :data:`hookimpl`. Registration hooks return plain data; core resolves
the chain itself, so no hook is ``firstresult`` and the registration order never matters.
"""

from __future__ import annotations

import pluggy

PROJECT = "crosschip"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def crosschip_register_backends():
    """Return a list of :class:`~crosschip.BackendDescriptor` (normally one, named like the
    entry point). Must be cheap: no device initialisation, no heavy imports."""


@hookspec
def crosschip_register_component_kinds():
    """Return a list of :class:`~crosschip.components.ComponentKind`: new kinds of building block
    (spec, canonical weights, reference implementation, call contract, conformance cases,
    tensor-parallel split). The reference backend builds each with the kind's ``reference``; this
    plugin and any other may implement it. Names must not collide with existing kinds."""


@hookspec
def crosschip_register_components():
    """Return a list of :class:`~crosschip.ComponentImpl` for backends this plugin registers."""


@hookspec
def crosschip_register_layouts():
    """Return a list of :class:`~crosschip.LayoutImpl`: reversible transforms between the
    canonical (Hugging Face) weights of a component and this backend's physical weights."""


@hookspec
def crosschip_validate_runtime(runtime):
    """Raise :class:`~crosschip.errors.ConfigurationError` if ``runtime`` settings (device,
    dtype, parallel degrees, precision) cannot work with a backend this plugin registers.
    Called for the backends a runtime may use."""


@hookspec
def crosschip_parallelize_model(model, runtime):
    """Apply the parallel plan to a model built on the meta device, before its weights are
    allocated and loaded; return the model (None means "no plan", an error when parallelism was
    asked for). Called only on one owner: the plugin of the backend that built the model's
    ``qkv_projection``, whose layouts the plan shards."""


@hookspec
def crosschip_finalize_model(model, runtime):
    """Last touch on a built and loaded model (compile, register buffers, ...). Called for every
    backend that built a component of the model."""


@hookspec
def crosschip_autocast(runtime):
    """Return a zero-argument callable that makes a fresh context manager for each forward
    (FP8 autocast, say), or None. Called once per runtime, lazily at the first forward, on the
    plugins of backends that built a component."""


@hookspec
def crosschip_checkpoint_function(runtime):
    """Return a replacement for ``torch.utils.checkpoint.checkpoint`` (same call signature) when
    this backend's modules need their own (Transformer Engine's keeps FP8 scaling state right
    across recomputation), or None."""


@hookspec
def crosschip_graph_function(runtime):
    """Return what records a model's layers as CUDA graphs for training
    (``compile="cuda-graph"``), or None. It is called as ``record(modules, sample_args,
    grads_consumed=...)``: a tuple of modules and a tuple of their sample argument tuples in (as
    ``torch.cuda.make_graphed_callables`` takes them), the modules out, their forwards (and so
    backwards) now replaying the graphs. ``grads_consumed``: every trainable parameter's gradient
    is used and dropped before its backward ends (the optimizer steps in the backward), so the
    gradients handed to autograd may alias the graphs' own buffers instead of copies. A backend
    whose modules keep state across steps returns the recorder that keeps it right (Transformer
    Engine's FP8 scales). Without one from any backend that built a component, the option is
    declined."""


@hookspec
def crosschip_step_boundary(runtime):
    """Called by a training loop once per optimizer step, after ``zero_grad``: a backend whose
    device executes lazily (XLA's ``mark_step`` on Trainium) cuts and runs the step's graph
    here. Called on the plugins of the backends that built a component; the return is ignored."""


@hookspec
def crosschip_training_state_format(model, runtime):
    """Return the format a training run saves ``model``'s and its optimizer's state in, when this
    backend has its own (neuronx-distributed's sharded checkpoints, say), or None for the default
    (torch.distributed.checkpoint). The object has ``name`` (recorded in the state's meta.json),
    ``save(model, optimizer, directory)`` and ``load(model, optimizer, directory)``; every rank
    calls both. Loading must run no code from the files. Called only on the plan owner (see
    ``crosschip_parallelize_model``)."""


@hookspec
def crosschip_environment_info():
    """Return a dict of diagnostic facts (library versions, devices); ``crosschip backends
    --json`` lists them per backend under ``environment``."""
