"""Packed sequences: several documents in one row, attention kept within each (``document_ids``)
and positions restarting per document, give every document the logits, and the batch the loss
and gradients, of training each document alone (float32, every CPU backend)."""

from __future__ import annotations

import pytest
import torch

import crosschip
from helpers import assert_rel_close, save_hf_llama

TOL = 1e-5


def pack(docs: list[torch.Tensor]):
    """One packed row: ids, document ids, positions restarting per document, and labels with
    -100 at each later document's first token (no document predicts the next one's start)."""
    ids = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    starts = torch.tensor([len(d) for d in docs]).cumsum(0)[:-1]
    labels[0, starts] = -100
    return ids, document_ids, position_ids, labels


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_packed_row_trains_each_document_as_alone(tmp_path, backend):
    save_hf_llama(tmp_path, sliding_window=None)
    model = crosschip.from_pretrained(tmp_path, backend=backend).train()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (n,), generator=gen) for n in (5, 9, 3)]
    ids, document_ids, position_ids, labels = pack(docs)
    packed = model(ids, position_ids=position_ids, document_ids=document_ids, labels=labels)
    packed.loss.backward()
    packed_grads = {k: g.clone() for k, g in model.hf_grads().items()}
    model.zero_grad()
    targets = sum(len(d) - 1 for d in docs)
    loss, start = 0.0, 0
    for doc in docs:
        alone = model(doc[None], labels=doc[None])
        assert_rel_close(packed.logits[:, start:start + len(doc)], alone.logits, TOL, f"{backend} logits")
        share = alone.loss * (len(doc) - 1) / targets  # the packed mean is over every document's targets
        share.backward()
        loss, start = loss + share.detach(), start + len(doc)
    assert_rel_close(packed.loss, loss, TOL, f"{backend} loss")
    for key, grad in model.hf_grads().items():
        assert_rel_close(packed_grads[key], grad, TOL, f"{backend} grad {key}")
    # Without document_ids the same row mixes the documents: the check above could fail.
    mixed = model(ids, position_ids=position_ids, labels=labels).logits
    assert (mixed[:, 5:14] - packed.logits[:, 5:14]).abs().max() > 1e-3
