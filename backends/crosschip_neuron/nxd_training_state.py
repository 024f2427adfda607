"""The neuron backend's training state as neuronx-distributed's own sharded checkpoint, so that a run
started with crosschip is consolidated by Optimum Neuron's tools (or ``crosschip convert``) and an
NxD checkpoint of the same model and tp resumes here.

Saving goes through NxD's ``trainer.save_checkpoint`` (its CPU mode on a machine without the
Neuron SDK, see :mod:`crosschip_neuron.cpu_mode`): ``training_state/shards/model/`` and
``optim/`` per rank, ``done`` last, in the plain format on CPU and xser on Trainium (xser moves
one tensor at a time off the device). Rank 0 then writes Optimum Neuron's
``mp_metadata_pp_rank_0.json`` beside them (:mod:`crosschip_neuron.nxd_checkpoint`); the tag is
Optimum's ``shards``, which its consolidation looks for.

Loading never uses NxD's ``load_checkpoint`` (it unpickles with ``weights_only=False``): the
rank files are read by crosschip's reader (``weights_only=True``, xser's reference the one extra
class), checked key by key, shape by shape and dtype by dtype against this rank's parameters and
optimizer, and the saved metadata must be the one this model would write (same tp, platform KV
arrangement and QKV fusion); anything else is refused, naming what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from crosschip.checkpoint.nxd.files import METADATA_FILE, OPTIMUM_TAG, NxdCheckpoint, safe_load
from crosschip.errors import CheckpointError, ConfigurationError

NAME = "nxd"


class NxdTrainingState:
    name = NAME

    def __init__(self, runtime):
        self.runtime = runtime

    def save(self, model, optimizer, directory: Path) -> None:
        import torch.distributed as dist

        from crosschip_neuron import xla
        from crosschip_neuron.nxd_checkpoint import local_state, metadata
        from crosschip_neuron.nxd_trainer import trainer

        meta = metadata(model, self.runtime)  # checked before anything is written
        trainer().save_checkpoint(str(directory), OPTIMUM_TAG, model=local_state(model),
                                  optimizer=optimizer.state_dict(), use_xser=xla.on_xla(self.runtime))
        if dist.get_rank() == 0:
            (directory / OPTIMUM_TAG / METADATA_FILE.format(pp=0)).write_text(json.dumps(meta.to_json(), indent=4))
        dist.barrier()

    def load(self, model, optimizer, directory: Path) -> None:
        import torch.distributed as dist

        from crosschip_neuron.nxd_checkpoint import metadata

        ckpt = NxdCheckpoint(directory)
        tp, rank = self.runtime.parallel.tp, dist.get_rank()
        if (ckpt.tp, ckpt.pp) != (tp, 1):
            raise ConfigurationError(f"{ckpt.tag_dir}: saved at tp={ckpt.tp}, pp={ckpt.pp}; this run has tp={tp}, pp=1")
        expected = json.loads(json.dumps(metadata(model, self.runtime).to_json()))
        path = ckpt.metadata_path(0)
        saved = json.loads(path.read_text()) if path is not None else None
        if saved is not None and saved != expected:
            raise ConfigurationError(
                f"{path}: the shards were saved in another layout than this model builds ({_first_difference(saved, expected)}); "
                "resume with the same platform (NEURON_PLATFORM_TARGET_OVERRIDE), CROSSCHIP_NEURON_FUSE_QKV and tp, "
                "or load the consolidated weights (crosschip convert)")
        state = ckpt.tensors(0, rank)
        params = dict(model.named_parameters())
        _check_keys(set(state.keys()), set(params), ckpt.files[(0, rank)])
        with torch.no_grad():
            for name, param in params.items():
                saved_tensor = state.get(name)
                _check_tensor(saved_tensor, param, name, ckpt.files[(0, rank)])
                param.copy_(saved_tensor)
        optim_file = ckpt.tag_dir / "optim" / ckpt.files[(0, rank)].name
        optimizer.load_state_dict(_optimizer_state(optim_file, optimizer, list(params.values()), ckpt.xser))
        ckpt.release()


def _check_keys(saved: set, wanted: set, path: Path) -> None:
    if saved != wanted:
        missing, extra = sorted(wanted - saved)[:3], sorted(saved - wanted)[:3]
        raise CheckpointError(f"{path}: holds other parameters than this model: missing {missing}, unexpected {extra}")


def _check_tensor(saved: torch.Tensor, param: torch.Tensor, name: str, path: Path) -> None:
    if tuple(saved.shape) != tuple(param.shape) or saved.dtype != param.dtype:
        raise CheckpointError(f"{path}: {name!r} is {tuple(saved.shape)} {saved.dtype} there, this rank's parameter "
                              f"is {tuple(param.shape)} {param.dtype}")


def _optimizer_state(path: Path, optimizer, params: list, xser: bool) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the optimizer state of this rank)")
    state = safe_load(path, "an optimizer state file", xser_references=xser)
    if xser:
        state = _resolve_references(state, path, path.parent)
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise CheckpointError(f"{path}: expected an optimizer state_dict ('state' and 'param_groups'), found "
                              f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    ids = [i for group in optimizer.state_dict()["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, [p for p in params if p.requires_grad]))
    for index, entry in state["state"].items():
        param = by_id.get(index)
        if param is None or not isinstance(entry, dict):
            raise CheckpointError(f"{path}: optimizer state for parameter {index!r}, which this optimizer does not have")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{path}: optimizer state {key!r} of parameter {index} is {tuple(value.shape)}, the "
                                      f"parameter is {tuple(param.shape)}")
    return state


def _resolve_references(value, path: Path, root: Path):
    """An xser optimizer file's references replaced by their tensors (crosschip's reader)."""
    from crosschip.checkpoint.nxd.files import TensorReference, read_reference

    if isinstance(value, TensorReference):
        return read_reference(value, path, root)
    if isinstance(value, dict):
        return {k: _resolve_references(v, path, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_references(v, path, root) for v in value]
    return value


def _first_difference(saved: dict, expected: dict) -> str:
    for section in ("model_weight_transformation_specs", "parameters"):
        if saved.get(section) != expected.get(section):
            a, b = saved.get(section), expected.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                return f"{section} {key!r}: saved {a.get(key)}, built {b.get(key)}"
            for x, y in zip(a or [], b or []):
                if x != y:
                    return f"{section}: saved {x}, built {y}"
            return f"{section} differ"
    return "the metadata differs"
