"""Optimum Neuron's own consolidation (``optimum.neuron.models.training.transformations_utils``),
for checking that it reads the shards crosschip writes. Optimum Neuron is installed ``--no-deps``
(as NxD is: its dependencies are the Neuron SDK's); its package ``__init__`` imports the SDK, so
the training subpackage is imported from the installed files with the packages above it
registered empty, after NxD's CPU-mode stand-ins (``crosschip_neuron.cpu_mode``)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

_PACKAGES = ("optimum.neuron", "optimum.neuron.models", "optimum.neuron.models.training", "optimum.neuron.utils")


def available() -> Path:
    """Optimum Neuron's installed ``optimum/neuron`` folder (found without importing it), or a
    skip (a failure where CROSSCHIP_REQUIRE_HARDWARE asks for neuron-cpu)."""
    spec = importlib.util.find_spec("optimum")
    root = Path(spec.submodule_search_locations[0]) / "neuron" if spec and spec.submodule_search_locations else None
    if root is None or not (root / "models" / "training" / "transformations_utils.py").is_file():
        if "neuron-cpu" in os.environ.get("CROSSCHIP_REQUIRE_HARDWARE", ""):
            pytest.fail("optimum-neuron is required (CROSSCHIP_REQUIRE_HARDWARE=neuron-cpu) but is not installed",
                        pytrace=False)
        pytest.skip("optimum-neuron is not installed")
    return root


def transformations_utils():
    """The module (call in a process of its own: it installs NxD's CPU-mode stand-ins)."""
    root = available()
    from crosschip_neuron.cpu_mode import nxd

    nxd()
    for name in _PACKAGES:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root / Path(*name.split(".")[2:]))]
            sys.modules[name] = package
    import optimum.neuron.models.training.transformations_utils as module

    return module


def consolidate(tag: Path) -> dict:
    """What Optimum Neuron's ``consolidate_model_parallel_checkpoints`` does for one pp stage of
    plain rank files: load them (``weights_only=True``), rebuild the specs from the metadata and
    reverse them."""
    utils = transformations_utils()
    files = sorted((tag / "model").glob("dp_rank_*.pt"))
    states = [torch.load(f, weights_only=True) for f in files]
    metadata = json.loads((tag / "mp_metadata_pp_rank_0.json").read_text())
    specs = [utils.ModelWeightTransformationSpecs.from_metadata(m) for m in metadata["model_weight_transformation_specs"]]
    sharded = {key: [state[key] for state in states] for key in states[0]}
    return utils.to_original_weights(specs, sharded, metadata["parameters"])
