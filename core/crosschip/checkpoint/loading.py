"""``crosschip.from_pretrained``: a local Hugging Face directory, or a Hub model id through the
local cache (:mod:`crosschip.checkpoint.hub`), onto any backend."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from crosschip.checkpoint import SafetensorsCheckpoint
from crosschip.errors import CheckpointError, ConfigurationError
from crosschip.models import model_class
from crosschip.plugins.resolution import BackendChoice
from crosschip.runtime import Runtime
from crosschip.specs import ParallelSpec
from crosschip.checkpoint.sizes import check_config_sizes, check_fits
from crosschip import weights
from crosschip.checkpoint import hub


def load_config(path: str | Path):
    """The Hugging Face config of a local directory, with errors that name the file."""

    directory = Path(path)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a Hugging Face model directory)")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a Hugging Face model directory needs config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON: {exc}") from exc
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ConfigurationError(f"{config_file}: no 'architectures' entry, cannot tell which model to build")
    cls = model_class(architectures[0], where=str(config_file))
    try:
        config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ConfigurationError(f"{config_file}: transformers cannot read it: {exc}") from exc
    return cls, config


def build_model(cls, config, runtime: Runtime, where: str = "config"):
    """Construct without initialising weights (meta device), apply the parallel plan while still
    on meta (so each rank allocates only its shards), check those fit, then allocate on the
    runtime device."""
    check_config_sizes(config, where)
    with torch.device("meta"), _default_dtype(runtime.dtype):
        model = cls(config, runtime)
    _parallelize(model, runtime)
    check_fits(model, runtime.device, where)  # this rank's shards, not the whole model
    model.to_empty(device=runtime.device)
    model.reset_buffers()
    return model


def from_pretrained(
    path: str | Path,
    backend: BackendChoice = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    strict: bool | None = None,
    *,
    components=None,
    precision: str = "auto",
    fp8_recipe: str = "delayed",
    activation_checkpointing: str = "none",
    tp: int = 1,
    dp: int = 1,
    sequence_parallel: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    ep: int = 1,
    revision: str | None = None,
    lora=None,
    adapter: str | Path | None = None,
    compile=False,
):
    """Load a Hugging Face causal-LM (config.json + safetensors) on any backend: a local
    directory, or a Hub model id ``org/name`` at ``revision`` (a branch, tag or commit; default
    ``main``) from the Hugging Face cache, downloading its safetensors first when online. A local
    directory of that name wins over the id.

    ``model.state_dict()`` then holds the backend's physical layout;
    ``model.save_pretrained(dir)`` writes the canonical Hugging Face layout back.

    ``tp > 1`` and/or ``dp > 1``: a launched process group of ``tp * dp`` ranks (torchrun) on a
    ``("dp", "tp")`` DeviceMesh; every rank calls this and reads from the checkpoint only the
    part of each weight it holds. ``tp`` shards each layer's projections (tensor parallel,
    optionally ``sequence_parallel``); ``dp`` shards parameters, gradients and optimizer state
    over the data-parallel ranks (FSDP2), which gather them to ``param_dtype`` for compute and
    average gradients in ``reduce_dtype``. ``ep`` (dividing ``dp``): a mixture of experts'
    experts sharded over groups of ``ep`` data-parallel ranks, tokens exchanged all-to-all.

    ``lora``: a :class:`crosschip.LoraConfig`, a new adapter (base weights frozen);
    ``adapter``: a PEFT adapter directory to attach (from crosschip or from PEFT).

    ``compile``: True, or a dict of ``torch.compile`` options (``mode``, ``fullgraph``,
    ``dynamic``, ``backend``, ``options``): the model's forward compiled in place (see
    :mod:`crosschip.modeling.compilation`), after any adapter is attached; or ``"cuda-graph"``:
    its layers' training forward and backward recorded as CUDA graphs at the first training
    step, without torch.compile (:mod:`crosschip.modeling.layer_graphs`; te, one GPU).
    """
    if lora is not None and adapter is not None:
        raise ConfigurationError("from_pretrained: give lora= (a new adapter) or adapter= (a saved one), not both")
    path = hub.resolve(path, revision, option="from_pretrained") or path
    nxd = _nxd_checkpoint(path)
    cls, config = load_config(nxd.config_dir if nxd is not None else path)
    if dtype is None:
        dtype = torch.float32
    if tp * dp > 1:  # under torchrun, join its process group unless the caller already did
        from crosschip.parallel.distributed import join_launched_group

        join_launched_group(None if device is None else str(device))
    runtime = Runtime(backend, components=components, device=device, dtype=dtype, strict=strict,
                      precision=precision, fp8_recipe=fp8_recipe,
                      activation_checkpointing=activation_checkpointing,
                      parallel=ParallelSpec(tp=tp, dp=dp, sequence_parallel=sequence_parallel,
                                            param_dtype=param_dtype, reduce_dtype=reduce_dtype, ep=ep))
    if nxd is not None:  # Trainium shards, consolidated one weight at a time as they load
        from crosschip.checkpoint.nxd.source import ConsolidatedSource

        checkpoint = ConsolidatedSource(nxd, config)
    else:
        checkpoint = SafetensorsCheckpoint(path)
    model = build_model(cls, config, runtime, where=str(Path(nxd.config_dir if nxd else path) / "config.json"))
    weights.load_canonical(model, checkpoint, set(model.ignored_checkpoint_keys))
    #: Tensor bytes this process read from the checkpoint (a sharded load reads only its part).
    model.checkpoint_bytes_read = checkpoint.bytes_read
    checkpoint.close()
    finalize(model)
    if lora is not None:
        model.add_adapter(lora)
    elif adapter is not None:
        model.load_adapter(adapter)
    from crosschip.modeling.compilation import compile_model

    compile_model(model, compile)
    return model.eval()


def _nxd_checkpoint(path):
    """The NxD sharded checkpoint at ``path`` (Optimum Neuron's model directory, a tag, or a
    directory of tags), or None for anything else (a Hugging Face directory, whose safetensors
    win where both are present)."""
    from crosschip.checkpoint.nxd.files import NxdCheckpoint, is_nxd_checkpoint

    directory = Path(path)
    if not directory.is_dir() or any((directory / n).is_file() for n in ("model.safetensors",
                                                                          "model.safetensors.index.json")):
        return None
    if not is_nxd_checkpoint(directory):
        return None
    ckpt = NxdCheckpoint(directory)
    if ckpt.config_dir is None:
        raise CheckpointError(f"{directory}: neuronx-distributed shards without a config.json beside them (Optimum "
                              "Neuron's layout puts it in the directory above the tag): consolidate them with "
                              "`crosschip convert SRC --out DST --config CONFIG` and load DST")
    return ckpt


def finalize(model) -> None:
    """The last touch of every backend that built a component, once the weights are in."""
    runtime = model.runtime
    runtime.registry.call_on(sorted({d.backend for d in runtime.report.decisions}),
                             "crosschip_finalize_model", model=model, runtime=runtime)


def _parallelize(model, runtime: Runtime) -> None:
    """Apply the parallel plan of one owner (:attr:`Runtime.plan_owner`): the plugin of the
    backend that built the attention projections, whose layout the plan shards, or the other
    sharded projections of a model without attention (two plugins sharding one model would
    conflict)."""
    if runtime.parallel == ParallelSpec():
        return
    owners = [runtime.plan_owner] if runtime.plan_owner else []
    applied = runtime.registry.call_on(owners, "crosschip_parallelize_model", model=model, runtime=runtime)
    if not any(result is not None for result in applied):
        raise ConfigurationError(
            f"{runtime.parallel}: backend {', '.join(owners) or '-'} has no parallel plan")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
