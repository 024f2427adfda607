"""docs/models.md's TinyLM, as the page writes it, at tp=2 on the torch backend: the same logits,
loss, gradients and AdamW steps as one process. Its block holds hidden-size input norms beside
the QKV projection, which the torch plan once took for per-head q/k norms (it guessed from the
module tree); norms now state their scope, and hidden-size ones are never per-head."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

import crosschip
from gloo_spawn import spawn
from helpers import assert_training_steps_match

DOCS = Path(__file__).parents[1] / "docs" / "models.md"


def _page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)


def _define_tinylm() -> None:
    """The page's first block: TinyLM, registered under its architecture name."""
    exec(_page_blocks()[0], {})


def _rank(rank: int, world: int, root: Path) -> None:
    _define_tinylm()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no scope guessed for its norms
        model = crosschip.from_pretrained(root / "tiny", backend="torch", tp=2).train()
    single = crosschip.from_pretrained(root / "tiny", backend="torch").train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert_training_steps_match(model, single, ids, 1e-5, "TinyLM tp=2")


def test_docs_tinylm_at_tp2_matches_one_process(tmp_path, monkeypatch):
    import crosschip.models as models

    models._load_builtin()
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # TinyLM is not for later tests
    monkeypatch.chdir(tmp_path)  # the page's second block saves to "tiny"
    namespace: dict = {}
    for block in _page_blocks()[:2]:
        exec(block, namespace)
    spawn(2, tmp_path, _rank)
