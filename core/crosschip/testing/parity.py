"""The parity kit: checks a crosschip model class against its transformers counterpart.

:func:`check_model` builds a random transformers model from a (tiny) config, saves it, loads the
directory with :func:`crosschip.from_pretrained` on each backend asked and compares, with
transformers as the oracle:

- ``logits``: logits and loss of one forward with labels;
- ``grads``: every parameter gradient by Hugging Face name (a missing or extra one is an error);
- ``save``: ``save_pretrained`` then ``transformers.AutoModelForCausalLM.from_pretrained``: no
  missing or unexpected keys, every tensor bitwise equal to the one transformers saved;
- ``generate``: greedy tokens identical to transformers' ``generate(do_sample=False)``;
- ``tp``: the torch backend at ``tp=N`` in N gloo processes: logits, loss and gradients equal
  to the single-process torch run.

Numbers compare as ``max|actual - expected| / max|expected|`` within the conformance kit's
tolerance for the dtype (:data:`crosschip.testing.conformance.TOLERANCES`, 1e-5 in float32).
Every check runs even when an earlier one failed; :class:`ParityError` then lists them all::

    from transformers import Qwen3Config
    from crosschip.testing import parity

    def test_my_family(tmp_path):
        parity.check_model(Qwen3Config(...), tmp_path)   # raises ParityError naming what differs

``model_class=`` checks a class that is not registered (yet): it is used for the config's
architecture for the duration of the check only. The ``tp`` check starts its ranks with
``spawn``, which imports the caller's main module again: a script (not a test) that asks for it
calls :func:`check_model` under ``if __name__ == "__main__":``, and the class must be importable
(defined at module level).
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from crosschip.errors import ConfigurationError
from crosschip.testing.conformance import _rel_err, tolerance_for

#: Every check, in the order they run. ``tp`` runs only when asked for (it starts processes).
CHECKS = ("logits", "grads", "save", "generate", "tp")
DEFAULT_CHECKS = ("logits", "grads", "save", "generate")


class ParityError(AssertionError):
    """A model differs from its transformers counterpart; the message lists every difference,
    and ``report`` holds the :class:`ParityReport`."""

    def __init__(self, report: "ParityReport"):
        super().__init__(str(report))
        self.report = report


@dataclass(frozen=True)
class CheckResult:
    """One check on one backend. ``max_error``: the largest relative error measured (None for
    the exact checks); ``problems``: one line per difference, empty when it passed."""

    check: str
    backend: str
    problems: tuple[str, ...] = ()
    max_error: float | None = None

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        error = "" if self.max_error is None else f" (max relative error {self.max_error:.3g})"
        head = f"{self.check} [{self.backend}]: {'passed' if self.passed else 'FAILED'}{error}"
        # A multi-line problem (an error's message, a rank's traceback) stays under its check.
        return [head, *("    " + line for p in self.problems for line in p.splitlines())]


@dataclass
class ParityReport:
    """What :func:`check_model` ran and measured; ``str`` is the readable summary."""

    architecture: str
    model_class: str
    dtype: torch.dtype
    tolerance: float
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> bool:
        return bool(self.results) and not self.failed

    @property
    def checks(self) -> list[str]:
        """The checks that ran, in order, once each."""
        return list(dict.fromkeys(r.check for r in self.results))

    def max_error(self, check: str) -> float | None:
        """The largest relative error of ``check`` over every backend (None: exact or not run)."""
        errors = [r.max_error for r in self.results if r.check == check and r.max_error is not None]
        return max(errors) if errors else None

    def __str__(self) -> str:
        head = (f"parity of {self.model_class} with transformers' {self.architecture} ({self.dtype}, "
                f"tolerance {self.tolerance:.3g}): {len(self.results) - len(self.failed)} passed, "
                f"{len(self.failed)} failed")
        return "\n".join([head, *("  " + line for r in self.results for line in r.lines())])


def check_model(config, directory: str | Path, *, model_class=None,
                backends: Iterable[str] = ("reference", "torch"), dtype: torch.dtype = torch.float32,
                checks: Iterable[str] | None = None, tp: int = 0, tolerance: float | None = None,
                seed: int = 0, batch: int = 2, seq_len: int = 16, max_new_tokens: int = 8,
                tp_timeout_s: float = 300.0) -> ParityReport:
    """Check the crosschip model for ``config`` (a transformers config; its class names the
    architecture) against transformers' model: ``checks`` (default :data:`DEFAULT_CHECKS`, plus
    ``tp`` when ``tp > 1``) on each of ``backends``. ``directory`` receives the checkpoints.

    ``model_class``: the crosschip class to check instead of the registered one. ``dtype``: the
    crosschip model's; transformers runs in float32 on the same weights rounded to ``dtype``.
    ``tp``: the tensor-parallel degree of the ``tp`` check (2 when ``checks`` names it alone).

    Returns the :class:`ParityReport`; raises :class:`ParityError` with it when anything differs.
    """
    checks = _selected(checks, tp)
    tp = tp if tp > 1 else 2
    tolerance = tolerance_for(dtype) if tolerance is None else tolerance
    directory = Path(directory)
    hf = random_transformers_model(config, seed)
    hf_dir = directory / "transformers"
    hf.save_pretrained(hf_dir)
    architecture = type(hf).__name__
    if dtype != torch.float32:  # the oracle computes in float32 on the weights crosschip holds
        hf.to(dtype).float()
    ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed + 1))
    expected = _run(hf, ids, dict(hf.named_parameters())) if {"logits", "grads"} & set(checks) else None

    name = getattr(model_class, "__name__", None) or _registered_name(architecture)
    report = ParityReport(architecture, name, dtype, tolerance)
    torch_run = None
    for backend in backends:
        try:
            with registered(model_class, architecture):
                model = _load(hf_dir, backend, dtype, model_class)
        except Exception as exc:  # reported as this backend's failure; the others still run
            report.results.append(CheckResult("load", backend, (f"{type(exc).__name__}: {exc}",)))
            continue
        if "logits" in checks or "grads" in checks:
            results, got = _forward_checks(model, backend, ids, expected, checks, tolerance)
            report.results.extend(results)
            torch_run = got if backend == "torch" else torch_run
        if "save" in checks:
            report.results.append(_guard("save", backend, _check_save, model, hf, directory / f"saved-{backend}"))
        if "generate" in checks:
            report.results.append(_guard("generate", backend, _check_generate, model, hf, ids, max_new_tokens))
    if "tp" in checks:
        # The ranks are fresh interpreters: they get the class itself (pickled by reference, so
        # its module is imported there, registering it) rather than this process's registry.
        rank_class = model_class or _registered_class(architecture)
        report.results.append(_guard("tp", f"torch tp={tp}", _check_tp, hf_dir, rank_class, architecture,
                                     dtype, ids, tp, tolerance, torch_run, directory, tp_timeout_s))
    if report.failed:
        raise ParityError(report)
    return report


@contextlib.contextmanager
def registered(model_class, architecture: str):
    """Load ``model_class`` for ``architecture`` inside the block (nothing when it is None);
    the registration in force before comes back afterwards, so a test registers nothing."""
    if model_class is None:
        yield
        return
    from crosschip import models

    models.supported_architectures()  # the built-in modules register on import: ours must win
    previous = models._REGISTRY.get(architecture)
    models._REGISTRY[architecture] = model_class
    try:
        yield
    finally:
        if previous is None:
            models._REGISTRY.pop(architecture, None)
        else:
            models._REGISTRY[architecture] = previous


# -- the pieces --------------------------------------------------------------------------------
def _selected(checks, tp: int) -> tuple[str, ...]:
    chosen = tuple(checks) if checks is not None else DEFAULT_CHECKS + (("tp",) if tp > 1 else ())
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        raise ConfigurationError(f"parity: unknown check {', '.join(map(repr, unknown))}; checks: {', '.join(CHECKS)}")
    if tp == 1 and "tp" in chosen:
        raise ConfigurationError("parity: the tp check needs tp > 1")
    return chosen


def random_transformers_model(config, seed: int = 0):
    """transformers' own model for ``config`` (eager attention, eval mode), seeded: random weights, with norm weights away from 1 and biases away from 0: a model that drops
    a norm or a bias then differs (initialised to 1 and 0 they would be no-ops)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


def _registered_class(architecture: str):
    from crosschip.models import model_class

    try:
        return model_class(architecture)
    except ConfigurationError:
        return None


def _registered_name(architecture: str) -> str:
    cls = _registered_class(architecture)
    return cls.__qualname__ if cls is not None else f"(no crosschip class for {architecture})"


def _load(path: Path, backend: str, dtype: torch.dtype, model_class):
    import crosschip

    model = crosschip.from_pretrained(path, backend=backend, dtype=dtype)
    if model_class is not None and type(model) is not model_class:
        raise ConfigurationError(f"from_pretrained built {type(model).__qualname__}, not {model_class.__qualname__}")
    return model


def _run(model, ids, hf_params):
    """Logits, loss and gradients (by Hugging Face name) of one forward with labels."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    if hf_params is None:
        grads = model.hf_grads()
    else:  # transformers lists a tied weight once, under the name it is stored
        grads = {n: p.grad for n, p in hf_params.items() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _forward_checks(model, backend, ids, expected, checks, tol):
    """``logits`` and ``grads`` from one forward and backward; also returns that run (None
    when the model's forward or backward raised, which fails both checks)."""
    try:
        got = _run(model, ids, None)
    except Exception as exc:
        failure = (f"{type(exc).__name__}: {exc}",)
        return [CheckResult(c, backend, failure) for c in ("logits", "grads") if c in checks], None
    results = []
    if "logits" in checks:
        results.append(_compare_outputs("logits", backend, got, expected, tol))
    if "grads" in checks:
        results.append(_compare_grads("grads", backend, got[2], expected[2], tol, "transformers"))
    return results, got


def _compare(name: str, actual, expected, tol: float, problems: list[str], errors: list[float]) -> None:
    if tuple(actual.shape) != tuple(expected.shape):
        problems.append(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    elif not torch.isfinite(actual).all():
        problems.append(f"{name}: non-finite values")
    else:
        err = _rel_err(actual, expected)
        errors.append(err)
        if not err <= tol:
            problems.append(f"{name}: relative error {err:.3g} > {tol:.3g}")


def _compare_outputs(check, backend, got, expected, tol) -> CheckResult:
    problems, errors = [], []
    _compare("logits", got[0], expected[0], tol, problems, errors)
    _compare("loss", got[1], expected[1], tol, problems, errors)
    return CheckResult(check, backend, tuple(problems), max(errors, default=None))


def _compare_grads(check, backend, got: dict, expected: dict, tol, oracle: str) -> CheckResult:
    problems, errors = [], []
    for key in sorted(set(expected) - set(got)):
        problems.append(f"{key}: no gradient ({oracle} has one of shape {tuple(expected[key].shape)})")
    for key in sorted(set(got) - set(expected)):
        problems.append(f"{key}: a gradient {oracle} does not have")
    for key in sorted(set(got) & set(expected)):
        _compare(key, got[key], expected[key], tol, problems, errors)
    return CheckResult(check, backend, tuple(problems), max(errors, default=None))


def _guard(check, backend, fn, *args) -> CheckResult:
    """Run one check; an exception is its failure (named), not the end of the others."""
    try:
        problems, error = fn(*args)
    except Exception as exc:
        problems, error = [f"{type(exc).__name__}: {exc}"], None
    return CheckResult(check, backend, tuple(problems), error)


def _check_save(model, hf, out: Path):
    """Saved, reloaded by transformers: the same keys and, bitwise, the same tensors."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(out)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    problems = [f"transformers: {what} keys {sorted(info[what])}"
                for what in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(what)]
    dtype = model.runtime.dtype
    saved, original = reloaded.state_dict(), hf.state_dict()
    for key in sorted(original):
        if key not in saved:
            continue  # reported as missing above
        got, expected = saved[key].to(dtype), original[key].to(dtype)
        if got.shape != expected.shape:
            problems.append(f"{key}: saved shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        elif not torch.equal(got, expected):
            diff = (got.double() - expected.double()).abs().max().item()
            problems.append(f"{key}: saved tensor differs (max abs difference {diff:.3g})")
    return problems, None


def _check_generate(model, hf, ids, max_new_tokens: int):
    """Greedy tokens from a prompt of half the inputs, no end-of-sequence stop on either side."""
    prompt = ids[:, : max(1, ids.shape[1] // 2)]
    pad = getattr(hf.config, "pad_token_id", None)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0 if pad is None else pad)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=max_new_tokens)
    if got.shape != expected.shape:
        return [f"tokens of shape {tuple(got.shape)}, transformers {tuple(expected.shape)}"], None
    problems = []
    for row in range(got.shape[0]):
        differs = (got[row] != expected[row]).nonzero()
        if len(differs):
            at = differs[0].item()
            problems.append(f"row {row}: new token {at - prompt.shape[1]} is {got[row, at].item()}, transformers "
                            f"{expected[row, at].item()} (from {got[row, prompt.shape[1]:].tolist()} vs "
                            f"{expected[row, prompt.shape[1]:].tolist()})")
    return problems, None


def _check_tp(hf_dir, model_class, architecture, dtype, ids, tp, tol, single, directory: Path, timeout_s):
    """The torch backend at ``tp`` ranks against its own single-process run."""
    if single is None:
        with registered(model_class, architecture):
            single = _run(_load(hf_dir, "torch", dtype, model_class), ids, None)
    out = directory / f"tp{tp}-rank0.pt"
    out.unlink(missing_ok=True)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    problems = _spawn(tp, (tp, init_method, str(hf_dir), model_class, architecture, dtype, ids, str(out)),
                      timeout_s)
    if problems:
        return problems, None
    ranks = torch.load(out)  # tensors only: the default weights_only load reads it
    outputs = _compare_outputs("tp", "", (ranks["logits"], ranks["loss"]), single, tol)
    gradients = _compare_grads("tp", "", ranks["grads"], single[2], tol, "the single-process run")
    errors = [e for e in (outputs.max_error, gradients.max_error) if e is not None]
    return [*outputs.problems, *gradients.problems], max(errors, default=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(world: int, args: tuple, timeout_s: float) -> list[str]:
    """``_tp_rank`` in ``world`` fresh processes (spawned: safe from a library and under pytest);
    a failing rank's traceback, or the timeout, comes back as the problem."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    context = mp.start_processes(_tp_rank, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                return [f"ranks still running after {timeout_s:g} s; stopped"]
    except ProcessException as exc:
        return [f"rank {exc.error_index} failed: {exc}".rstrip()]
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return []


def _tp_rank(rank, world, init_method, hf_dir, model_class, architecture, dtype, ids, out) -> None:
    """One rank of the ``tp`` check: load at ``tp=world``, forward and backward; rank 0 writes
    the logits, loss and gathered gradients to ``out``."""
    import torch.distributed as dist

    from crosschip.parallel.distributed import shutdown

    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        import crosschip

        with registered(model_class, architecture):
            model = crosschip.from_pretrained(hf_dir, backend="torch", dtype=dtype, tp=world)
        logits, loss, grads = _run(model, ids, None)  # every rank takes part in gathering
        if rank == 0:
            torch.save({"logits": logits, "loss": loss, "grads": grads}, out)
    except BaseException:
        dist.destroy_process_group()  # a failed rank must not wait on a barrier its peers skip
        raise
    shutdown()


__all__ = ["CHECKS", "DEFAULT_CHECKS", "CheckResult", "ParityError", "ParityReport", "check_model",
           "random_transformers_model", "registered"]
