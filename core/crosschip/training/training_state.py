"""The training state beside a checkpoint: model and optimizer through torch.distributed.checkpoint
(each rank writes its shards; a later run may load them at another tp/dp layout) and a
``meta.json`` written last. Reading goes through :mod:`crosschip.checkpoint.safe_dcp`, which runs
no code from the files. A state is refused, naming what differs, when its weights do not fit the
model or are held in another physical layout (recorded per component: the layout's repr, which
names what it depends on, such as the tp degree or a platform's KV-head arrangement)."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from crosschip.parallel import local_shards
from crosschip.checkpoint import safe_dcp
from crosschip.parallel.distributed import barrier, rank
from crosschip.errors import CheckpointError, ConfigurationError

STATE_DIR = "training_state"  # torch.distributed.checkpoint of model and optimizer, any layout
STATE_META = "meta.json"


def layouts_of(model) -> dict[str, str]:
    """``backend:component`` -> the weight layout its modules hold (its transforms' repr)."""
    from crosschip.weights import bindings

    found: dict[str, set] = {}
    for b in bindings(model):
        found.setdefault(f"{b.info.backend}:{b.info.component}", set()).add(repr(b.transform))
    return {k: " | ".join(sorted(v)) for k, v in sorted(found.items())}



DCP = "dcp"  # the default format: torch.distributed.checkpoint


def native_format(model):
    """The plan owner's own training-state format (``crosschip_training_state_format``), or None."""
    runtime = model.runtime
    owners = [runtime.plan_owner] if runtime.plan_owner else []
    found = [f for f in runtime.registry.call_on(owners, "crosschip_training_state_format", model=model,
                                                  runtime=runtime) if f is not None]
    return found[0] if found else None


def save_training_state(model, optimizer, directory: Path, meta: dict) -> None:
    """Model and optimizer in the backend's own format where it has one (the neuron backend:
    NxD's sharded checkpoint), else through torch.distributed.checkpoint (each rank writes its
    shards; a later run may load them at another layout); then the metadata, written last: a
    save that did not finish has no meta.json and is refused on resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    native = native_format(model)
    meta = {**meta, "format": native.name if native is not None else DCP}
    if native is not None:
        directory.mkdir(parents=True, exist_ok=True)
        native.save(model, optimizer, directory)
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optim": local_shards.optimizer_state_views(model, optim_state)},
                     checkpoint_id=str(directory))
    if rank() == 0:
        (directory / STATE_META).write_text(json.dumps(meta, indent=1) + "\n")
    barrier()


def load_training_state(model, optimizer, directory: Path, meta: dict, run_at=(1, 1), resume=None) -> None:
    resume = resume or directory.parent
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved_at = (meta.get("tp", 1), meta.get("dp", 1))
    native = native_format(model)
    saved_format, this_format = meta.get("format", DCP), (native.name if native is not None else DCP)
    if saved_format not in (this_format, DCP):  # a DCP state (any backend's, or older) loads everywhere
        raise ConfigurationError(
            f"--resume {resume}: its training state is in the {saved_format!r} format (saved with backends "
            f"{meta.get('backends', '?')}), this run saves {this_format!r}; resume on the backend that saved it, or "
            "start from the Hugging Face checkpoint in that directory (--model)")
    if saved_format == DCP:
        native = None
    if native is not None:
        if tuple(saved_at) != tuple(run_at):
            raise ConfigurationError(
                f"--resume {resume}: its {saved_format} training state was saved at tp={saved_at[0]}, dp={saved_at[1]}; "
                f"this run has tp={run_at[0]}, dp={run_at[1]}; it resumes only at the layout it was saved at (the "
                "Hugging Face checkpoint in that directory loads at any)")
    else:
        options = _options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        _check_state_fits(model_state, directory, saved_at, run_at)
    # The state holds physical weights: a layout that depends on the parallel degree (te's
    # gate/up blocks per TP rank) orders them differently at another layout, shapes alike.
    layouts = layouts_of(model)
    if meta.get("layouts", layouts) != layouts:
        changed = sorted(k for k in layouts if meta["layouts"].get(k) != layouts[k])
        first = changed[0]
        raise ConfigurationError(
            f"--resume {resume}: its training state holds the weights of {', '.join(changed)} "
            f"in another physical layout than this run builds (saved at tp={saved_at[0]}, dp={saved_at[1]}; "
            f"this run has tp={run_at[0]}, dp={run_at[1]}; {first} saved as {meta['layouts'].get(first)}, "
            f"built as {layouts[first]}); resume at the saved layout, or start from the Hugging Face "
            "checkpoint in that directory (--model)")
    if native is not None:
        native.load(model, optimizer, directory)
        return
    state = {"model": model_state, "optim": local_shards.optimizer_state_views(model, optim_state)}
    try:
        with _single_process_is_intended():
            safe_dcp.load(state, directory)
    except CheckpointError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"--resume {resume}: the saved training state does not fit this "
                                 f"model and layout: {exc}") from exc
    # optim_state was filled in place through the views.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state,
                   options=options)


def _options(model):
    """With an adapter the base is frozen and is not part of the run's state (it is the
    ``--model`` the run starts from): only the trainable parameters are saved and restored
    (loading is not strict about the frozen ones; the saved keys were checked to be exactly the
    trainable ones by :func:`_check_state_fits`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if getattr(model, "lora_adapter", None) is None:
        return None
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _check_state_fits(model_state: dict, directory: Path, saved_at=(1, 1), run_at=(1, 1)) -> None:
    """The saved model state must have this model's weights at this model's (global) shapes,
    whatever layout either was sharded in; otherwise say which, with both shapes. (Global
    physical shapes depend on the layout only where KV heads are replicated, tp > KV heads.)"""
    try:
        saved = safe_dcp.read_metadata_file(directory / ".metadata").state_dict_metadata
    except CheckpointError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"{directory}: not a readable training state: {exc}") from exc
    saved = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    problems = []
    for name, tensor in model_state.items():
        entry = saved.get(name)
        if entry is None:
            problems.append(f"{name} is missing there")
        elif hasattr(entry, "size") and tuple(entry.size) != tuple(tensor.shape):
            problems.append(f"{name} has shape {tuple(entry.size)} there, {tuple(tensor.shape)} in this model")
    problems += [f"{name} is there but not in this model" for name in saved if name not in model_state]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        listed = f"{'; '.join(problems[:3])}{more}"
        if tuple(saved_at) != tuple(run_at):
            raise ConfigurationError(
                f"{directory}: this training state does not fit this model: {listed}; it was saved at "
                f"tp={saved_at[0]}, dp={saved_at[1]} and this run has tp={run_at[0]}, dp={run_at[1]} (a "
                "different model, or KV heads replicated where tp exceeds them, which resume only at "
                "the same tp; the Hugging Face checkpoint in that directory loads at any layout)")
        raise ConfigurationError(f"{directory}: this training state was saved by a different model: {listed}")


@contextlib.contextmanager
def _single_process_is_intended():
    """torch.distributed.checkpoint warns when no process group exists; one process is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
