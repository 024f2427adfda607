"""Old import paths of modules that moved into the subpackages (``crosschip.layouts`` is now
``crosschip.weights.layouts``, ``crosschip.train`` is ``crosschip.training.train``...):
importing an old path gives the very same module object, so code written against the flat
layout (model files, plugins, scripts) keeps working, attribute patches included. Each first import of an old path warns once (DeprecationWarning)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module path -> new one.
MOVED = {
    f"crosschip.{old}": f"crosschip.{package}.{old}" for package, olds in {
        "modeling": ("generation", "masks", "rope", "compilation"),
        "weights": ("layouts", "init"),
        "checkpoint": ("loading", "sharded_load", "hub", "convert", "sizes"),
        "parallel": ("distributed", "kv_replication", "local_shards"),
        "training": ("train", "train_args", "training_state", "resume", "periodic_saves", "schedule", "clipping",
                     "metrics", "data", "corpus", "tokenizer", "presets"),
    }.items() for old in olds
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there (the old path will be "
                      "removed)", DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the module is the new one, already executed


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before any finder that knows the old files
