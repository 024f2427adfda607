"""The flat module paths of earlier releases still import, as the very modules that moved (so
attribute patches reach them), each with a DeprecationWarning naming the new path; core itself
imports none of them."""

from __future__ import annotations

import subprocess
import sys

from crosschip._moved import MOVED

_CHECK = r"""
import importlib, sys, warnings
import crosschip
from crosschip._moved import MOVED
# The old paths are flat (crosschip.<module>): a blanket rename to the new paths, which once
# rewrote this check to import the new path twice, fails here instead of passing vacuously.
OLD, NEW = "crosschip.layouts", "crosschip.weights.layouts"
assert OLD.count(".") == 1 and MOVED[OLD] == NEW, (OLD, NEW)
assert all(old.count(".") == 1 and new.count(".") == 2 for old, new in MOVED.items()), MOVED
# A from-import of the old path, as user code writes it, before anything imported it.
assert OLD not in sys.modules
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from crosschip.layouts import interleave_rows
from crosschip.weights.layouts import interleave_rows as moved
assert interleave_rows is moved and sys.modules[OLD] is sys.modules[NEW]
assert [w.category for w in caught] == [DeprecationWarning] and NEW in str(caught[0].message), caught
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.modules.pop(old, None)  # import again, so every old path warns here
        module = importlib.import_module(old)
    assert module is importlib.import_module(new), old
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
print("ok", len(MOVED))
"""


def test_old_paths_are_the_moved_modules_with_a_warning():
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", str(len(MOVED))]


def test_core_and_backends_import_no_old_path():
    """Everything a user runs (the CLI, a model, every backend) without a deprecation warning."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); "
            "import crosschip.cli, crosschip.checkpoint.loading, crosschip.models, crosschip.training.train, "
            "crosschip_torch.plugin, crosschip_torch.parallel, crosschip_te.plugin, crosschip_neuron.plugin; "
            "crosschip.models._load_builtin()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
