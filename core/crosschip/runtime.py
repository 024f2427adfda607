"""The Runtime: what a model asks for its building blocks.

A model receives a Runtime in its constructor and asks it for each component by semantic spec
(``runtime.qkv_projection(QKVSpec(...))``). The runtime walks the backend chain for that component,
skips backends that are unavailable or decline the spec (recording why), builds the module with
the first that accepts, and tags the module with what it is so the weight adapter can translate
its parameters to and from the canonical Hugging Face layout.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from crosschip.errors import (
    ComponentBuildError,
    CrosschipError,
    ConfigurationError,
    CrosschipWarning,
    StrictFallbackError,
)
from crosschip.plugins.descriptors import ComponentImpl, resolve_callable
from crosschip.plugins.registry import REFERENCE, Registry, get_registry, strict_from_env
from crosschip.plugins.report import Decision, DecisionReport
from crosschip.plugins.resolution import BackendChoice, check_component_name, check_environment, resolve_chain
from crosschip.specs import (
    CHECKPOINTING,
    FP8_RECIPES,
    PRECISIONS,
    AttentionSpec,
    EmbeddingSpec,
    GatedMLPSpec,
    LayerNormSpec,
    LinearSpec,
    LMHeadSpec,
    LossSpec,
    MLPSpec,
    NormSpec,
    ParallelSpec,
    QKVSpec,
    RopeSpec,
    describe,
    extensions_used,
)

MODES = ("train", "inference")


#: Kinds whose backend owns a parallel model's plan, by precedence: the attention projections
#: first (the plan shards their layout), then the other sharded projections.
PLAN_OWNER_KINDS = ("qkv_projection", "out_projection", "gated_mlp", "mlp", "moe", "linear")


@dataclass(frozen=True)
class ComponentInfo:
    """Attached to every module the runtime builds (``module.crosschip_component``)."""

    component: str
    backend: str
    spec: Any
    fuses_input_norm: bool = False


@dataclass(frozen=True)
class BuildContext:
    """What a factory or ``supports`` check may look at besides the spec."""

    runtime: "Runtime"
    component: str
    backend: str

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runtime.dtype

    @property
    def parallel(self) -> ParallelSpec:
        return self.runtime.parallel


class Runtime:
    """Backend chain, device, dtype, parallel settings, mode, and the decision report.

    Args:
        backend: a backend name, a comma-separated chain or list of names, or None / ``"auto"``.
            A name overrides the environment for every component; None and ``"auto"`` defer to
            ``CROSSCHIP_BACKEND_<COMPONENT>``, then ``CROSSCHIP_BACKEND``, then priority.
        components: per-component overrides, ``{"attention": "reference"}``; beat ``backend``.
        device: where modules run; default CUDA when available, else CPU.
        dtype: parameter dtype; default float32.
        strict: an accelerated request may not end on ``reference`` and plugin failures are
            errors; default from ``CROSSCHIP_STRICT``.
        parallel: tensor/data parallel degrees.
        mode: ``"train"`` or ``"inference"``.
        registry: the plugin registry to resolve against (default: the process-wide one).
        precision: ``"auto"`` (compute in ``dtype``) or ``"fp8"`` (FP8 matmuls where a backend
            implements them; an error if none of the requested backends can).
        fp8_recipe: ``"delayed"``, ``"current"``, ``"block"`` or ``"mxfp8"`` scaling.
        activation_checkpointing: ``"none"``, ``"full"`` (recompute every decoder layer in the
            backward pass) or ``"selective"`` (every other layer, torchtitan's selective layer
            policy: about half the activation memory for about half the recompute).
    """

    def __init__(
        self,
        backend: BackendChoice = None,
        *,
        components: Mapping[str, BackendChoice] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        strict: bool | None = None,
        parallel: ParallelSpec | None = None,
        mode: str = "train",
        precision: str = "auto",
        fp8_recipe: str = "delayed",
        activation_checkpointing: str = "none",
        registry: Registry | None = None,
    ):
        self.registry = registry or get_registry()
        self.strict = strict_from_env(strict)
        if self.strict:
            self.registry.raise_for_problems()
        check_environment(self.registry)
        for name in components or {}:
            check_component_name(name, where="argument components", registry=self.registry)
        if mode not in MODES:
            raise ConfigurationError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        self.backend = backend
        self.components = dict(components or {})
        self.device = parse_device(device) if device is not None else _default_device()
        self.dtype = _parse_dtype(dtype)
        self.parallel = parallel or ParallelSpec()
        #: The torch.distributed DeviceMesh of a parallel model, set by the backend that applies
        #: the parallel plan (None for a single-process model).
        self.device_mesh = None
        self.mode = mode
        if precision not in PRECISIONS:
            raise ConfigurationError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        if fp8_recipe not in FP8_RECIPES:
            raise ConfigurationError(f"fp8_recipe={fp8_recipe!r}: expected one of {', '.join(FP8_RECIPES)}")
        self.precision = precision
        self.fp8_recipe = fp8_recipe
        if activation_checkpointing not in CHECKPOINTING:
            raise ConfigurationError(f"activation_checkpointing={activation_checkpointing!r}: expected one of "
                                     f"{', '.join(CHECKPOINTING)}")
        self.activation_checkpointing = activation_checkpointing
        self._checkpoint_fn = None
        self.report = DecisionReport()
        self._warned: set = set()
        self._autocast_factories: list | None = None
        requested = self._requested_backends()  # resolves every chain: unknown names fail here
        self._check_precision(requested)
        self.registry.call_on(requested, "crosschip_validate_runtime", runtime=self)

    def _requested_backends(self) -> list[str]:
        """Every backend that may build some component, available or not."""
        names: list[str] = []
        for component in self.registry.component_names():
            for name in self.chain(component).backends:
                if name not in names:
                    names.append(name)
        return names

    def _check_precision(self, requested: list[str]) -> None:
        if self.precision != "fp8":
            return
        reasons = []
        for name in requested:
            record = self.registry.backend(name)
            if "fp8" not in record.descriptor.precisions:
                continue
            probe = record.probe()
            if probe.available:
                return
            reasons.append(f"{name}: unavailable: {probe.reason}")
        raise ConfigurationError(
            f"precision='fp8' needs a backend that implements FP8 (te), but none of the requested "
            f"backends ({' > '.join(requested)}) can" + (f": {'; '.join(reasons)}" if reasons else "")
            + "; FP8 is never replaced by a silent bf16 run")

    def checkpoint_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` recomputes its activations in the backward pass."""
        if self.activation_checkpointing == "full":
            return True
        return self.activation_checkpointing == "selective" and index % 2 == 0

    def checkpoint(self, function, *args):
        """Run ``function(*args)`` without keeping its activations (recomputed in backward),
        with the checkpoint function a backend asks for, else torch's non-reentrant one."""
        if self._checkpoint_fn is None:
            provided = self._from_builders("crosschip_checkpoint_function")
            if provided:
                self._checkpoint_fn = provided[0]
            else:
                from torch.utils.checkpoint import checkpoint

                self._checkpoint_fn = checkpoint
        return self._checkpoint_fn(function, *args, use_reentrant=False)

    def graph_function(self):
        """What records a model's layers as CUDA graphs (its call is the
        ``crosschip_graph_function`` hook's), from the plugins of the backends that built its
        components; None when none offers one (:mod:`crosschip.modeling.layer_graphs`)."""
        provided = self._from_builders("crosschip_graph_function")
        return provided[0] if provided else None

    def autocast(self):
        """The context a model's forward runs under, from the plugins of the backends that built
        its components (FP8 autocast for ``te``); a no-op context for plain backends."""
        if self._autocast_factories is None:
            self._autocast_factories = self._from_builders("crosschip_autocast")
        if not self._autocast_factories:
            return contextlib.nullcontext()
        return self._entered(self._autocast_factories)

    def step_boundary(self) -> None:
        """The end of a training step (after the optimizer's ``zero_grad``): backends that
        execute lazily run the step's graph here (``crosschip_step_boundary``)."""
        used = sorted({d.backend for d in self.report.decisions})
        self.registry.call_on(used, "crosschip_step_boundary", runtime=self)

    @staticmethod
    @contextlib.contextmanager
    def _entered(factories):
        # Entered at `with`, and a context entered before a later one fails is exited.
        with contextlib.ExitStack() as stack:
            for factory in factories:
                stack.enter_context(factory())
            yield

    def _from_builders(self, hook: str) -> list:
        """What ``hook`` returns (None dropped) from the plugins of the backends that built this
        runtime's components."""
        used = sorted({d.backend for d in self.report.decisions})
        return [f for f in self.registry.call_on(used, hook, runtime=self) if f is not None]

    def __repr__(self) -> str:
        return (f"Runtime(backend={self.backend!r}, device={self.device}, dtype={self.dtype}, "
                f"precision={self.precision!r}, strict={self.strict}, parallel={self.parallel}, "
                f"mode={self.mode!r})")

    # -- resolution -----------------------------------------------------------------------
    @property
    def plan_owner(self) -> str | None:
        """The backend whose parallel plan a parallel model gets: the one that built the
        attention projections, whose layout the plan shards (two plugins sharding one model
        would conflict). A model without attention (an MLP stack of ``linear`` components) gets
        the plan of the backend that built its first kind in :data:`PLAN_OWNER_KINDS` order, so
        it is sharded rather than refused for having no QKV projection. None before any
        projection is built."""
        for kind in PLAN_OWNER_KINDS:
            built = sorted(self.report.backends_for(kind))
            if built:
                return built[0]
        return None

    def chain(self, component: str):
        return resolve_chain(self.registry, component, self.backend, self.components)

    def select(self, component: str, spec: Any = None):
        """Walk the chain: ``(implementation, backend, chain, declines)``. With ``spec=None``
        (listing, no concrete spec) the backends' ``supports`` checks are skipped."""
        chain = self.chain(component)
        declines: list[tuple[str, str]] = []
        for backend in chain.backends:
            impl, reason = self._candidate(component, spec, backend)
            if impl is not None:
                return impl, backend, chain, declines
            if reason is not None:
                declines.append((backend, reason))
        return None, None, chain, declines

    def component(self, kind: str, spec: Any) -> nn.Module:
        """Build a component of ``kind`` (any kind, built-in or a plugin's) for ``spec`` with the
        first backend in its chain that accepts. The named methods (:meth:`attention`...) are
        this call for the built-in kinds."""
        return self.build(kind, spec)

    def build(self, component: str, spec: Any) -> nn.Module:
        """Build ``component`` for ``spec`` with the first backend in its chain that accepts
        (:meth:`component` under its older name)."""
        expected = self.registry.kind(component).spec
        if not isinstance(spec, expected):
            raise ConfigurationError(f"{component} takes a {expected.__name__}, found {type(spec).__name__} "
                                     f"({describe(spec)})")
        impl, backend, chain, declines = self.select(component, spec)
        if impl is None:
            raise ComponentBuildError(
                f"no backend could build {component} for {describe(spec)}: "
                + "; ".join(f"{b}: {r}" for b, r in declines)
            )
        if backend == REFERENCE and chain.accelerated and declines:
            self._fell_back(component, spec, declines)
        elif backend not in chain.named:
            self._named_unavailable(component, spec, backend, chain, declines)
        self._check_fp8(component, spec, backend)
        try:
            module = resolve_callable(impl.factory)(spec, BuildContext(self, component, backend))
        except CrosschipError:
            raise  # the backend's own account of what is wrong
        except Exception as exc:
            raise ComponentBuildError(f"backend {backend!r} failed to build {component} for {describe(spec)}: "
                                      f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise ComponentBuildError(
                f"backend {backend!r} built {type(module).__name__} for {component}, expected "
                "a torch.nn.Module"
            )
        module.crosschip_component = ComponentInfo(component, backend, spec, impl.fuses_input_norm)
        self.report.record(Decision(component, describe(spec), backend, chain.source,
                                    chain.backends, tuple(declines)))
        return module

    def _candidate(self, component: str, spec, backend: str) -> tuple[ComponentImpl | None, str | None]:
        """The implementation to use, or None with the reason it was passed over (None reason:
        the backend simply does not implement this component and declares no reason, which is no
        decline)."""
        record = self.registry.backend(backend)
        probe = record.probe()
        if not probe.available:
            return None, f"unavailable: {probe.reason}"
        if self.device.type not in record.descriptor.device_types:
            return None, (f"device type {self.device.type!r} not supported "
                          f"(supports {', '.join(record.descriptor.device_types)})")
        impl = self.registry.components.get((backend, component))
        if impl is None:
            return None, record.descriptor.declined_kinds.get(component)
        unhandled = [] if spec is None or "*" in impl.handles else [
            e for e in extensions_used(spec, impl.fuses_input_norm) if e not in impl.handles]
        if unhandled:
            return None, (f"the spec sets {', '.join(unhandled)}, which this implementation does not declare "
                          "it handles (ComponentImpl.handles)")
        if impl.supports is not None and spec is not None:
            reason = resolve_callable(impl.supports)(spec, BuildContext(self, component, backend))
            if reason:
                return None, str(reason)
        return impl, None

    _GEMM_COMPONENTS = ("qkv_projection", "out_projection", "gated_mlp", "mlp", "linear", "moe")

    def _check_fp8(self, component: str, spec, backend: str) -> None:
        """Under ``precision="fp8"`` a projection built by a backend without FP8 runs in
        ``dtype``: never silently (a warning), and an error in strict mode."""
        if self.precision != "fp8" or component not in self._GEMM_COMPONENTS:
            return
        if "fp8" in self.registry.backend(backend).descriptor.precisions:
            return
        message = (f"precision='fp8': {component} for {describe(spec)} was built by {backend!r}, which "
                   f"has no FP8, so it computes in {self.dtype}")
        if self.strict:
            raise StrictFallbackError(f"strict mode: {message}")
        key = ("fp8", component, backend)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CrosschipWarning, stacklevel=4)

    def _named_unavailable(self, component: str, spec, backend: str, chain, declines) -> None:
        """A backend the request named was unavailable, and a declared fallback (not the
        reference, which :meth:`_fell_back` reports) built the component instead: never silently."""
        missing = [(b, r) for b, r in declines if b in chain.named and r.startswith("unavailable")]
        if not missing:
            return
        reasons = "; ".join(f"{b}: {r}" for b, r in missing)
        message = (f"{component} for {describe(spec)} was built by {backend!r}, a declared fallback, because the "
                   f"requested backend is unavailable ({reasons}; requested by {chain.source})")
        if self.strict:
            raise StrictFallbackError(f"strict mode: {message}")
        key = ("unavailable", component, tuple(missing))
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CrosschipWarning, stacklevel=4)

    def _fell_back(self, component: str, spec, declines) -> None:
        reasons = "; ".join(f"{b}: {r}" for b, r in declines)
        message = f"{component} for {describe(spec)} fell back to the reference backend ({reasons})"
        if self.strict:
            raise StrictFallbackError(f"strict mode: {message}")
        key = (component, tuple(declines))
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CrosschipWarning, stacklevel=4)

    # -- one method per component, so model code reads as what it builds ------------------
    def embedding(self, spec: EmbeddingSpec) -> nn.Module:
        return self.build("embedding", spec)

    def qkv_projection(self, spec: QKVSpec) -> nn.Module:
        return self.build("qkv_projection", spec)

    def out_projection(self, spec: LinearSpec) -> nn.Module:
        return self.build("out_projection", spec)

    def gated_mlp(self, spec: GatedMLPSpec) -> nn.Module:
        return self.build("gated_mlp", spec)

    def mlp(self, spec: MLPSpec) -> nn.Module:
        return self.build("mlp", spec)

    def moe(self, spec) -> nn.Module:
        """A mixture of experts (:class:`crosschip.specs.MoESpec`); returns ``(output, router_logits)``."""
        return self.build("moe", spec)

    def linear(self, spec: LinearSpec) -> nn.Module:
        return self.build("linear", spec)

    def rms_norm(self, spec: NormSpec) -> nn.Module:
        return self.build("rms_norm", spec)

    def layer_norm(self, spec: LayerNormSpec) -> nn.Module:
        return self.build("layer_norm", spec)

    def norm(self, spec: NormSpec | LayerNormSpec) -> nn.Module:
        """An ``rms_norm`` or ``layer_norm`` component, whichever ``spec`` describes."""
        return self.build("layer_norm" if isinstance(spec, LayerNormSpec) else "rms_norm", spec)

    def rotary(self, spec: RopeSpec) -> nn.Module:
        return self.build("rotary", spec)

    def attention(self, spec: AttentionSpec) -> nn.Module:
        return self.build("attention", spec)

    def lm_head(self, spec: LMHeadSpec) -> nn.Module:
        return self.build("lm_head", spec)

    def loss(self, spec: LossSpec) -> nn.Module:
        return self.build("loss", spec)

    def input_norm(self, spec: NormSpec | LayerNormSpec, consumer: nn.Module) -> nn.Module:
        """The pre-norm feeding ``consumer`` (a projection built with ``input_norm=spec``): an
        identity when the consumer's backend fused the norm in, else an ``rms_norm`` or
        ``layer_norm`` component. Either way the Hugging Face norm weights map to whichever
        module holds them."""
        info = getattr(consumer, "crosschip_component", None)
        if info is not None and info.fuses_input_norm:
            return nn.Identity()
        return self.norm(spec)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_device(device: str | torch.device, where: str = "device") -> torch.device:
    """``device`` as a torch.device that this machine has; ``where`` names the option in errors.
    torch itself accepts ``cuda`` on a machine without CUDA and fails only at the first
    allocation, with an assertion deep inside torch."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"{where} {device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1): "
                                 f"{exc}") from exc
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigurationError(f"{where} {device!r}: CUDA is not available on this machine "
                                     f"(torch {torch.__version__}, cuda {torch.version.cuda}); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigurationError(f"{where} {device!r}: this machine has {count} CUDA device(s), "
                                     f"cuda:0 to cuda:{count - 1}")
    return parsed


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigurationError(f"dtype={dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]
