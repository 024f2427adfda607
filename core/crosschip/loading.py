"""``crosschip.from_pretrained``: a local Hugging Face directory onto any backend."""

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
from crosschip.sizes import check_config_sizes, check_fits
from crosschip import weights


def load_config(path: str | Path):
    """The Hugging Face config of a local directory, with errors that name the file."""
    from transformers import AutoConfig

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
    """Construct without initialising weights (meta device), check the sizes fit, then allocate
    on the runtime device."""
    check_config_sizes(config, where)
    with torch.device("meta"), _default_dtype(runtime.dtype):
        model = cls(config, runtime)
    check_fits(model, runtime.device, where)
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
):
    """Load a local Hugging Face causal-LM directory (config.json + safetensors) on any backend.

    ``model.state_dict()`` then holds the backend's physical layout;
    ``model.save_pretrained(dir)`` writes the canonical Hugging Face layout back.
    """
    cls, config = load_config(path)
    if dtype is None:
        dtype = torch.float32
    runtime = Runtime(backend, components=components, device=device, dtype=dtype, strict=strict,
                      precision=precision, fp8_recipe=fp8_recipe,
                      activation_checkpointing=activation_checkpointing)
    checkpoint = SafetensorsCheckpoint(path)
    model = build_model(cls, config, runtime, where=str(Path(path) / "config.json"))
    weights.load_canonical(model, checkpoint, set(model.ignored_checkpoint_keys))
    checkpoint.close()
    runtime.registry.call_on(sorted({b for d in runtime.report.decisions for b in [d.backend]}),
                             "crosschip_finalize_model", model=model, runtime=runtime)
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
