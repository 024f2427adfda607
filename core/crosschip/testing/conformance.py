"""The conformance kit: checks a backend against the reference backend, which is the test oracle.

For each component a backend implements, the kit builds it for a few tiny specs exactly as a
model does (through :class:`crosschip.Runtime`, on the meta device, then materialised), builds the
same with ``reference``, loads both from the same canonical (Hugging Face) weights through the
layouts the backends registered, and compares outputs, input gradients and weight gradients (mapped
back to canonical names) within a tolerance derived from the dtype. It also checks the backend's
descriptor and that every layout round trip canonical -> physical -> canonical is bitwise
identical.

A plugin runs it against itself::

    from crosschip.testing import conformance

    def test_backend_conforms():
        report = conformance.check_backend("mybackend")   # raises ConformanceError on a mismatch
        assert report.passed

or with one pytest test per case::

    @pytest.mark.parametrize("case", conformance.cases("mybackend"), ids=str)
    def test_parity(case):
        outcome = conformance.check_case("mybackend", case)
        if outcome.declined:
            pytest.skip(outcome.detail)

A spec the backend declines (its ``supports`` returns a reason, or it is unavailable here) is
reported as declined, not passed: the fallback backend would build it, so there is nothing of this
backend's to compare.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from crosschip import weights
from crosschip.errors import CheckpointError, ConfigurationError, CrosschipError
from crosschip.weights.layouts import IDENTITY, canonical_shapes
from crosschip.modeling.masks import AttentionMask
from crosschip.modeling import CausalLM
from crosschip.plugins.descriptors import PLUGIN_API_VERSION, BackendDescriptor, Probe, resolve_callable
from crosschip.plugins.registry import REFERENCE, Registry, get_registry
from crosschip.plugins.resolution import check_component_name
from crosschip.runtime import BuildContext, Runtime

PASSED, DECLINED, FAILED = "passed", "declined", "failed"

#: Largest allowed ``max|actual - expected| / max|expected|`` per dtype. The reference runs in
#: float32 (or wider) on the same dtype-rounded weights and inputs, so this bounds the backend's own
#: rounding. float64 is held to float32 accuracy because the reference normalises, softmaxes and
#: builds rotary tables in float32 whatever the dtype, as transformers does.
TOLERANCES = {
    torch.float64: 1e-5,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,  # about 4 ulp of bfloat16
    torch.float16: 4e-3,  # about 4 ulp of float16
}

_BATCH, _SEQ = 2, 5


class ConformanceError(AssertionError):
    """A backend does not conform; the message names the check, the case and what differed."""


@dataclass(frozen=True)
class Case:
    """One spec of one component to check. ``options`` tune the inputs (input shape, mask...)."""

    component: str
    spec: Any
    label: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def __str__(self) -> str:
        return f"{self.component}[{self.label}]"


@dataclass(frozen=True)
class Outcome:
    case: Case | None
    check: str  # "descriptor", "parity" or "layout"
    status: str  # PASSED, DECLINED or FAILED
    detail: str = ""

    @property
    def declined(self) -> bool:
        return self.status == DECLINED

    def line(self) -> str:
        what = f"{self.check} {self.case}" if self.case is not None else self.check
        return f"{what}: {self.status}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ConformanceReport:
    backend: str
    device: str
    dtype: torch.dtype
    outcomes: list[Outcome] = field(default_factory=list)

    def _with(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def passed(self) -> list[Outcome]:
        return self._with(PASSED)

    @property
    def declined(self) -> list[Outcome]:
        return self._with(DECLINED)

    @property
    def failed(self) -> list[Outcome]:
        return self._with(FAILED)

    def __str__(self) -> str:
        head = (f"conformance of backend {self.backend!r} on {self.device}, {self.dtype}: "
                f"{len(self.passed)} passed, {len(self.declined)} declined, {len(self.failed)} failed")
        return "\n".join([head, *("  " + o.line() for o in self.outcomes)])


def tolerance_for(dtype: torch.dtype) -> float:
    """The default tolerance of outputs and gradients in ``dtype`` (see :data:`TOLERANCES`)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ConfigurationError(f"no conformance tolerance for {dtype}; pass tolerance=") from None


# -- the cases --------------------------------------------------------------------------------
def default_cases(component: str, registry: Registry | None = None) -> list[Case]:
    """The cases the component's kind declares (:attr:`ComponentKind.cases`): tiny specs
    covering what models ask of it."""
    kind = (registry or get_registry()).kind(component)
    return [Case(component, spec, label, tuple(sorted(options.items()))) for label, spec, options in kind.cases()]


def cases(backend: str, components: Iterable[str] | None = None, registry: Registry | None = None) -> list[Case]:
    """Default cases for every component ``backend`` implements (or the named subset)."""
    registry = registry or get_registry()
    implemented = registry.components_of(registry.backend(backend).name)
    if components is None:
        wanted = implemented
    else:
        wanted = [check_component_name(c, registry=registry) for c in components]
        missing = [c for c in wanted if c not in implemented]
        if missing:
            raise ConfigurationError(f"backend {backend!r} does not implement {', '.join(missing)}; "
                                     f"it implements {', '.join(implemented) or 'nothing'}")
    return [case for component in wanted for case in default_cases(component, registry)]


# -- the descriptor ---------------------------------------------------------------------------
def _probe_initialises_cuda_afresh(backend: str) -> bool:
    """Run ``backend``'s probe in a new interpreter (same plugins, same environment) and report
    whether CUDA was initialised afterwards."""
    code = ("import sys, torch; from crosschip.plugins.registry import get_registry; "
            "get_registry().backends[sys.argv[1]].descriptor.probe(); print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code, backend], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ConformanceError(f"backend {backend!r}: probing it in a fresh interpreter failed: "
                               f"{out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1] == "True"


def check_descriptor(backend: str, registry: Registry | None = None, probe_budget_s: float = 1.0) -> BackendDescriptor:
    """The plugin loaded; the descriptor is well formed; the probe is cheap, returns a
    :class:`~crosschip.Probe` and initialises no device; every registration resolves."""
    registry = registry or get_registry()
    plugin = registry.plugins.get(backend)
    if backend not in registry.backends:
        if plugin is not None:
            raise ConformanceError(f"backend {backend!r}: plugin is {plugin.status}: {plugin.reason}")
        raise ConformanceError(f"backend {backend!r} is not registered; registered: "
                               f"{', '.join(registry.backend_names())}")
    record = registry.backends[backend]
    d = record.descriptor
    problems = []
    if d.name != backend:
        problems.append(f"descriptor name {d.name!r} differs from the backend name")
    if d.api_version != PLUGIN_API_VERSION:
        problems.append(f"api_version {d.api_version}, expected {PLUGIN_API_VERSION}")
    if not isinstance(d.priority, int) or isinstance(d.priority, bool):
        problems.append(f"priority {d.priority!r} is not an int")
    if not isinstance(d.device_types, tuple) or not d.device_types or not all(
            isinstance(t, str) and t for t in d.device_types):
        problems.append(f"device_types {d.device_types!r} is not a non-empty tuple of device type names")
    if not isinstance(d.fallbacks, tuple) or backend in d.fallbacks:
        problems.append(f"fallbacks {d.fallbacks!r} must be a tuple of other backends' names")

    cuda_was_initialised = torch.cuda.is_initialized()
    start = time.perf_counter()
    try:
        result = d.probe()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        result = None
        problems.append(f"probe raised {type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - start
    if result is not None and not isinstance(result, Probe):
        problems.append(f"probe returned {type(result).__name__}, expected crosschip.Probe")
    if elapsed > probe_budget_s:
        problems.append(f"probe took {elapsed:.2f}s (budget {probe_budget_s}s): it runs whenever "
                        "backends are listed or resolved, so it must stay cheap")
    if not cuda_was_initialised and torch.cuda.is_initialized():
        problems.append("probe initialised CUDA; probes must never initialise a device")
    elif cuda_was_initialised and registry is get_registry() and _probe_initialises_cuda_afresh(backend):
        # CUDA was already up here, which would hide the probe's own initialisation.
        problems.append("probe initialised CUDA (seen in a fresh interpreter); probes must never "
                        "initialise a device")

    for component in registry.components_of(backend):
        impl = registry.components[(backend, component)]
        for what, target in (("factory", impl.factory), ("supports", impl.supports)):
            if target is None:
                continue
            try:
                resolve_callable(target)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{component} {what} {target!r} does not resolve: {type(exc).__name__}: {exc}")
    for (owner, component), layout in registry.layouts.items():
        if owner != backend:
            continue
        try:
            resolve_callable(layout.transform)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{component} layout {layout.transform!r} does not resolve: "
                            f"{type(exc).__name__}: {exc}")
    if problems:
        raise ConformanceError(f"backend {backend!r} descriptor: " + "; ".join(problems))
    return d


# -- building both sides ----------------------------------------------------------------------
class _Harness(CausalLM):
    """A minimal model holding one component (and, where needed, the reference norm before it and
    the LM head a loss uses), so the weight adapter maps its weights exactly as a real model's."""

    def __init__(self, runtime: Runtime, build: Callable[[], dict[str, nn.Module]], names):
        super().__init__(None, runtime)
        self._names = names
        for path, module in build().items():
            self.add_module(path, module)

    def checkpoint_names(self):
        return self._names


@dataclass
class _Side:
    harness: _Harness
    dtype: torch.dtype

    @property
    def component(self) -> nn.Module:
        return self.harness.component

    def extra(self, name: str) -> nn.Module | None:
        return getattr(self.harness, name, None)

    def helpers(self) -> dict[str, nn.Module]:
        return {name.removeprefix("helper_"): module for name, module in self.harness.named_children()
                if name.startswith("helper_")}


def _runtime(backend_choice, components, device, dtype, registry) -> Runtime:
    return Runtime(backend_choice, components=components, device=device, dtype=dtype, strict=False,
                   registry=registry)


def _select(backend: str, case: Case, device, dtype, registry) -> tuple[Runtime, str | None]:
    """The runtime that builds ``case`` with ``backend``, and the reason it declines (or None)."""
    runtime = _runtime(None, {case.component: backend}, device, dtype, registry)
    impl, chosen, _, declines = runtime.select(case.component, case.spec)
    if chosen == backend:
        return runtime, None
    reasons = [r for b, r in declines if b == backend]
    return runtime, (reasons[0] if reasons else f"{backend!r} does not implement {case.component}")


def _build_side(backend_runtime: Runtime, reference: Runtime, case: Case, *, fused_norm: bool,
                reference_norm: bool) -> _Side:
    from crosschip.checkpoint.loading import build_model  # the path from_pretrained takes: meta, then to_empty

    def build():
        modules = {"component": backend_runtime.build(case.component, case.spec)}
        if reference_norm:
            modules["norm"] = reference.norm(case.spec.input_norm)
        helpers = backend_runtime.registry.kind(case.component).helpers(case.spec)
        for name, (kind, spec) in helpers.items():
            modules[f"helper_{name}"] = reference.build(kind, spec)
        return modules

    # A fused input norm's weight maps to the same canonical key as the reference's separate norm.
    names = {"component": {"norm": "norm"}} if fused_norm else {}
    harness = build_model(lambda config, runtime: _Harness(runtime, build, names), None, backend_runtime)
    return _Side(harness, backend_runtime.dtype)


def _sides(backend: str, case: Case, device, dtype, registry) -> tuple[_Side, _Side] | str:
    runtime, declined = _select(backend, case, device, dtype, registry)
    if declined:
        return declined
    reference_dtype = torch.promote_types(dtype, torch.float32)
    reference = _runtime(REFERENCE, None, device, reference_dtype, registry)
    impl = registry.components[(backend, case.component)]
    fused = impl.fuses_input_norm and getattr(case.spec, "input_norm", None) is not None
    tested = _build_side(runtime, reference, case, fused_norm=fused, reference_norm=False)
    info = tested.component.crosschip_component
    if info.backend != backend:
        raise ConformanceError(f"{case}: runtime built it with {info.backend!r}, not {backend!r}")
    oracle = _build_side(reference, reference, case, fused_norm=False, reference_norm=fused)
    return tested, oracle


# -- weights and inputs ------------------------------------------------------------------------
def _canonical_weights(side: _Side, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights under the canonical keys of ``side``'s components."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for binding in weights.bindings(side.harness):
        for key, shape in binding.hf_shapes.items():
            if binding.info.component in ("rms_norm", "layer_norm") or key.endswith("norm.weight"):
                # Not all ones, so a norm weight that is dropped or misplaced shows.
                tensor = torch.rand(shape, generator=gen) + 0.5
            elif key.endswith("bias"):
                tensor = torch.randn(shape, generator=gen) * 0.1
            else:
                tensor = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
            out[key] = tensor
    return out


def _load(side: _Side, canonical: dict[str, torch.Tensor], case: Case, what: str) -> None:
    try:
        side.harness.load_hf_state_dict(canonical)
    except (CheckpointError, RuntimeError, KeyError, ValueError) as exc:
        raise ConformanceError(f"{case}: loading canonical weights into the {what} failed: {exc}") from exc


def _inputs(case: Case, seed: int, registry: Registry) -> tuple[dict[str, Any], torch.Tensor | None]:
    """float32 inputs for ``case`` (:attr:`ComponentKind.example`) and, where some outputs are to
    be ignored (queries of padding tokens), a ``[batch, seq]`` mask of the rows that count."""
    gen = torch.Generator().manual_seed(seed + 1)
    example = registry.kind(case.component).example(case.spec, dict(case.options), gen)
    return dict(example.inputs), example.keep


def _to_side(inputs: dict[str, Any], side: _Side, run_dtype: torch.dtype, device) -> dict[str, Any]:
    """Inputs for one side: float tensors rounded to the runtime dtype (so both sides see the same
    values), then cast to the side's dtype, as leaves that collect gradients."""
    out = {}
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            # A fresh leaf per side: .to() returns the very same tensor when nothing changes,
            # and a shared leaf would make both sides' input gradients one tensor.
            value = value.to(run_dtype).to(device=device, dtype=side.dtype).detach().clone().requires_grad_()
        elif torch.is_tensor(value):
            value = value.to(device)
        elif isinstance(value, AttentionMask) and value.padding is not None:
            value = dataclasses.replace(value, padding=value.padding.to(device))
        out[name] = value
    return out


def _forward(case: Case, side: _Side, x: dict[str, Any], registry: Registry) -> tuple[torch.Tensor, ...]:
    """Call the component by its kind's call contract; returns its output tensors in order."""
    norm = side.extra("norm")
    if norm is not None:  # the reference applies the input norm a fused backend does itself
        x = {**x, "x": norm(x["x"])}
    return tuple(registry.kind(case.component).call(side.component, x, side.helpers()))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(1e-12) if expected.numel() else torch.tensor(1.0)
    return ((actual - expected).abs().max() / scale).item() if expected.numel() else 0.0


def _compare(name: str, actual, expected, tol: float, problems: list[str]) -> None:
    if actual is None or expected is None:
        problems.append(f"{name}: {'missing' if actual is None else 'unexpected'} on the backend "
                        f"(reference has {'none' if expected is None else tuple(expected.shape)})")
        return
    if tuple(actual.shape) != tuple(expected.shape):
        problems.append(f"{name}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}")
        return
    if not torch.isfinite(actual).all():
        problems.append(f"{name}: non-finite values")
        return
    err = _rel_err(actual, expected)
    if not err <= tol:
        problems.append(f"{name}: relative error {err:.3g} > {tol:.3g}")


# -- the checks --------------------------------------------------------------------------------
def check_case(backend: str, case: Case, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, tolerance: float | None = None,
               registry: Registry | None = None, seed: int = 0) -> Outcome:
    """Outputs, input gradients and canonical weight gradients of ``backend``'s module for
    ``case`` match the reference. Returns a passed or declined :class:`Outcome`; raises
    :class:`ConformanceError` on a mismatch."""
    registry = registry or get_registry()
    tol = tolerance if tolerance is not None else tolerance_for(dtype)
    sides = _sides(backend, case, device, dtype, registry)
    if isinstance(sides, str):
        return Outcome(case, "parity", DECLINED, sides)
    tested, oracle = sides
    canonical = {k: v.to(dtype) for k, v in _canonical_weights(tested, seed).items()}
    _load(tested, canonical, case, f"{backend!r} module")
    _load(oracle, {k: v.to(oracle.dtype) for k, v in canonical.items()}, case, "reference module")

    raw, keep = _inputs(case, seed, registry)
    problems: list[str] = []
    results = []
    for side in (tested, oracle):
        x = _to_side(raw, side, dtype, device)
        outputs = _forward(case, side, x, registry)
        gen = torch.Generator().manual_seed(seed + 2)
        objective = 0.0
        for out in outputs:
            # A fixed random projection of every output, so every gradient path is exercised.
            weight = torch.randn(out.shape, generator=gen).to(out.device)
            if keep is not None and out.dim() >= 2 and tuple(out.shape[:2]) == tuple(keep.shape):
                weight = weight * keep.to(out.device).view(*keep.shape, *([1] * (out.dim() - 2)))
            if out.requires_grad:
                objective = objective + (out.float() * weight).sum()
        if torch.is_tensor(objective):
            objective.backward()
        grads = side.harness.hf_grads()
        inputs = {n: v.grad for n, v in x.items() if torch.is_tensor(v) and v.requires_grad}
        results.append((outputs, inputs, grads))

    (outs, in_grads, w_grads), (ref_outs, ref_in_grads, ref_w_grads) = results
    if len(outs) != len(ref_outs):
        problems.append(f"returned {len(outs)} tensors, reference {len(ref_outs)}")
    for i, (a, e) in enumerate(zip(outs, ref_outs)):
        if keep is not None and a.dim() >= 2 and tuple(a.shape[:2]) == tuple(keep.shape):
            a, e = a[keep.to(a.device)], e[keep.to(e.device)]  # padding queries' outputs are unused
        _compare(f"output {i}", a, e, tol, problems)
    for name in sorted(set(in_grads) | set(ref_in_grads)):
        _compare(f"gradient of input {name!r}", in_grads.get(name), ref_in_grads.get(name), tol, problems)
    for key in sorted(set(w_grads) | set(ref_w_grads)):
        _compare(f"gradient of weight {key!r}", w_grads.get(key), ref_w_grads.get(key), tol, problems)
    if problems:
        raise ConformanceError(f"backend {backend!r} {case} ({dtype}, {device}) differs from the "
                               "reference: " + "; ".join(problems))
    return Outcome(case, "parity", PASSED)


def check_layout(backend: str, case: Case, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, registry: Registry | None = None,
                 seed: int = 0) -> Outcome:
    """canonical -> physical -> canonical is bitwise identical, the physical tensors are exactly
    the module's state, and weights loaded into the module read back unchanged."""
    registry = registry or get_registry()
    runtime, declined = _select(backend, case, device, dtype, registry)
    if declined:
        return Outcome(case, "layout", DECLINED, declined)
    reference = _runtime(REFERENCE, None, device, dtype, registry)
    impl = registry.components[(backend, case.component)]
    fused = impl.fuses_input_norm and getattr(case.spec, "input_norm", None) is not None
    side = _build_side(runtime, reference, case, fused_norm=fused, reference_norm=False)
    module = side.component
    problems = []

    layout = registry.layouts.get((backend, case.component))
    transform = (resolve_callable(layout.transform)(case.spec, BuildContext(runtime, case.component, backend))
                 if layout is not None else IDENTITY)
    shapes = canonical_shapes(case.component, case.spec, module.crosschip_component.fuses_input_norm, registry)
    gen = torch.Generator().manual_seed(seed)
    canonical = {role: torch.randn(shape, generator=gen).to(dtype) for role, shape in shapes.items()}
    physical = transform.apply(dict(canonical))
    # Extra state (Transformer Engine's FP8 scaling metadata) is module runtime state, no weight.
    state = {k: v for k, v in module.state_dict().items() if not k.endswith(weights.EXTRA_STATE)}
    if set(physical) != set(state):
        problems.append(f"layout gives physical keys {sorted(physical)}, the module holds {sorted(state)}")
    else:
        for key, tensor in physical.items():
            if tuple(tensor.shape) != tuple(state[key].shape):
                problems.append(f"physical {key!r} has shape {tuple(tensor.shape)}, the module's "
                                f"{tuple(state[key].shape)}")
    back = transform.invert(physical)
    if set(back) != set(canonical):
        problems.append(f"round trip gives roles {sorted(back)}, expected {sorted(canonical)}")
    for role, tensor in canonical.items():
        if role in back and not (back[role].dtype == tensor.dtype and torch.equal(back[role], tensor)):
            problems.append(f"round trip of {role!r} is not bitwise identical")

    if not problems:  # through the weight adapter and the module itself
        keyed = {k: v.to(dtype) for k, v in _canonical_weights(side, seed).items()}
        _load(side, keyed, case, f"{backend!r} module")
        try:
            read = side.harness.hf_state_dict()
        except RuntimeError as exc:
            raise ConformanceError(f"backend {backend!r} {case} layout: {exc}") from exc
        for key, tensor in keyed.items():
            got = read.get(key)
            if got is None or not torch.equal(got.cpu(), tensor.to(got.dtype)):
                problems.append(f"{key!r} does not read back bitwise identical after loading")
    if problems:
        raise ConformanceError(f"backend {backend!r} {case} layout ({dtype}): " + "; ".join(problems))
    return Outcome(case, "layout", PASSED)


def check_backend(backend: str, components: Iterable[str] | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  tolerance: float | None = None, registry: Registry | None = None,
                  case_list: Iterable[Case] | None = None) -> ConformanceReport:
    """Every check for ``backend``: descriptor, then parity and layout for each case. Raises
    :class:`ConformanceError` listing every failure; returns the report (declined cases
    included, so a caller can insist that something actually ran)."""
    registry = registry or get_registry()
    report = ConformanceReport(backend, str(device), dtype)
    check_descriptor(backend, registry)
    report.outcomes.append(Outcome(None, "descriptor", PASSED))
    for case in (case_list if case_list is not None else cases(backend, components, registry)):
        for check in (check_case, check_layout):
            kwargs = dict(device=device, dtype=dtype, registry=registry)
            if check is check_case:
                kwargs["tolerance"] = tolerance
            try:
                report.outcomes.append(check(backend, case, **kwargs))
            except (AssertionError, CrosschipError, RuntimeError, TypeError, ValueError, KeyError) as exc:
                name = "parity" if check is check_case else "layout"
                report.outcomes.append(Outcome(case, name, FAILED, f"{type(exc).__name__}: {exc}"))
    if report.failed:
        raise ConformanceError(str(report))
    return report


__all__ = [
    "DECLINED", "FAILED", "PASSED", "TOLERANCES", "Case", "ConformanceError", "ConformanceReport",
    "Outcome", "cases", "check_backend", "check_case", "check_descriptor", "check_layout",
    "default_cases", "tolerance_for",
]
