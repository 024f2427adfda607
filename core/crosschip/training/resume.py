"""What a resume may change, and the saved ``meta.json`` it continues from.

A run is defined by its RUN_DEFINING arguments (the model it started from and its revision, the
adapter it trains (``--lora``), the data, the batch, the optimizer's schedule, the numerics). A resume takes the saved value of each one it leaves at
its default (``crosschip train --resume DIR`` continues the run as it was started); one given
with another value would silently make it another run, so it is refused, naming the saved and
the new value, unless ``--override name=value`` says that the change is intended (also the way
back to a default value). Every other argument may change
freely: how long (``--steps`` extends the run, stretching its cosine schedule over the new
total, ``--stop-after``), where it is saved (``--out``, ``--resume``), how it is laid out and run
(``--backend``, which must still build the same backends per component, ``--device``, ``--tp``,
``--dp``, ``--sequence-parallel``, ``--activation-checkpointing``, ``--compile``,
``--optimizer-in-backward``), shown (``--log-every``,
``--log``), measured (``--eval-data``, ``--eval-every``) and saved along the way
(``--save-every``, ``--keep-last``).
The arguments recorded in the next save are the ones this run actually used.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

from crosschip.errors import CheckpointError, ConfigurationError


def _optional(parse):
    return lambda text: None if text.lower() == "none" else parse(text)


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, found {text!r}")
    return text.lower() in ("true", "1")


#: argument -> how ``--override name=VALUE`` parses VALUE
RUN_DEFINING = {
    "model": str, "text": _optional(str), "seed": int, "batch_size": int, "seq_len": int, "lr": float,
    "warmup": _optional(int), "dtype": str, "precision": str, "fp8_recipe": str,
    # The data and how it becomes tokens (the held-out fraction changes the training rows).
    "data": _optional(str), "text_field": str, "messages_field": str, "train_on": str,
    "long_documents": str, "eval_fraction": float, "packing": _flag,
    # The optimizer's schedule and update.
    "lr_schedule": str, "grad_accumulation": int, "weight_decay": float, "max_grad_norm": float,
    "revision": _optional(str),  # with model: which revision of a Hub model id the run started from
    "lora": _optional(str),  # the adapter trained on the frozen base (its rank, scale, targets, ...)
}
#: What the saved meta.json must hold, with the type of each.
META_FIELDS = {"step": int, "losses": list, "args": dict, "backends": dict}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def normalised(name: str, value):
    """``value`` of argument ``name`` as it is recorded and compared: a path that exists as an
    absolute path, so a resume from another working directory still matches."""
    if name in ("model", "text", "data") and isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    if name == "lora" and isinstance(value, str):
        return _canonical_lora(value)
    return value


def _canonical_lora(text: str) -> str:
    """``--lora`` text spelled one way (``alpha=32,r=16`` and ``r=16,alpha=32.0`` alike), so a
    resume compares adapters, not spellings; text that does not parse is kept as it is."""
    from crosschip.lora.config import LoraConfig

    try:
        c = LoraConfig.parse(text)
    except ConfigurationError:
        return text
    parts = [f"r={c.r}", f"alpha={float(c.alpha)!r}", f"dropout={float(c.dropout)!r}",
             "targets=" + "+".join(c.target_modules)]
    parts += [flag for flag, on in (("dora", c.use_dora), ("rslora", c.use_rslora)) if on]
    return ",".join(parts + ([f"init={c.init}"] if c.init != "default" else []))


def read_meta(resume: str, meta_file: Path) -> dict:
    """The saved ``meta.json`` of ``--resume``, with every field a resume relies on."""
    if not Path(resume).is_dir():
        raise ConfigurationError(f"--resume {resume}: not a directory")
    if not meta_file.is_file():
        raise ConfigurationError(f"--resume {resume}: {meta_file.parent.name}/{meta_file.name} missing (not a "
                                 "training checkpoint, or its save did not finish)")
    try:  # strict JSON, never a pickle: nothing read from a checkpoint runs code
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_file}: not valid JSON (the training state's metadata of --resume "
                              f"{resume}): {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: holds a {type(meta).__name__}, expected a JSON object (--resume "
                              f"{resume})")
    problems = [f"{name} is missing" if name not in meta else f"{name} is {type(meta[name]).__name__}, "
                f"expected {kind.__name__}" for name, kind in META_FIELDS.items()
                if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool)]
    if not problems and len(meta["losses"]) != meta["step"]:
        problems.append(f"losses has {len(meta['losses'])} entries for step {meta['step']}")
    if problems:
        raise CheckpointError(f"{meta_file}: not a complete training state (--resume {resume}): "
                              f"{'; '.join(problems)}")
    return meta


def parse_overrides(items) -> dict:
    """``["lr=1e-4", "seed=1,batch_size=8"]`` -> ``{"lr": 1e-4, "seed": 1, "batch_size": 8}``."""
    parsed: dict = {}
    for item in items or ():
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, sep, text = part.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in RUN_DEFINING:
                raise ConfigurationError(f"--override {part!r}: expected name=value with a name among "
                                         f"{', '.join(RUN_DEFINING)}")
            if name == "lora":
                raise ConfigurationError("--override lora: a resume continues the adapter saved in --resume; to "
                                         "train another adapter, start a new run without --resume")
            if name in ("model", "revision"):
                raise ConfigurationError(f"--override {name}: a resume always continues the weights saved in "
                                         "--resume; to start a new run from them, pass that directory as --model "
                                         "without --resume")
            try:
                value = RUN_DEFINING[name](text.strip())
            except ValueError as exc:
                raise ConfigurationError(f"--override {part!r}: {exc}") from exc
            if name in parsed and parsed[name] != value:
                raise ConfigurationError(f"--override gives {name} twice: {parsed[name]!r} and {value!r}")
            parsed[name] = value
    return parsed


def resumed_args(args, saved: dict):
    """``args`` with ``--override`` applied, once checked against the ``saved`` arguments of the
    run it resumes (``saved`` None: a fresh run, which takes no override)."""
    overrides = parse_overrides(args.override)
    if saved is None:
        if overrides:
            raise ConfigurationError(f"--override {','.join(overrides)} applies only with --resume; a new run "
                                     f"takes {', '.join(_option(n) for n in overrides)} directly")
        return args
    defaults = {f.name: f.default for f in fields(args)}
    for name, value in overrides.items():  # a value given both ways must agree
        given = getattr(args, name)
        if given != defaults[name] and given != value:
            raise ConfigurationError(f"{_option(name)} {given} and --override {name}={value} disagree")
    # Left at its default, a run-defining argument continues the saved run's value.
    inherited = {name: saved[name] for name in RUN_DEFINING
                 if name in saved and name not in overrides and getattr(args, name) == defaults[name]}
    args = replace(args, **inherited, **overrides)
    changed = [(name, saved[name], getattr(args, name)) for name in RUN_DEFINING
               if name in saved and normalised(name, saved[name]) != normalised(name, getattr(args, name))
               and name not in overrides]
    if changed:
        listed = ", ".join(f"{_option(n)} {new} (saved {old})" for n, old, new in changed)
        hint = ",".join(f"{n}={new}" for n, _, new in changed if n not in ("model", "revision", "lora"))
        raise ConfigurationError(
            f"--resume {args.resume} continues a run with other settings: {listed}; pass the saved values"
            + (f", or --override {hint} if the change is intended" if hint else ""))
    return args


def recorded(args) -> dict:
    """The arguments to save with the training state: what this run actually used."""
    return {f.name: normalised(f.name, getattr(args, f.name)) for f in fields(args)}
