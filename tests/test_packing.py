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


def test_packed_chat_batches_train_each_conversation_as_alone_and_resume_exactly(tmp_path):
    """`--packing`: the data path packs conversations into rows whose loss is the unpadded
    conversations' loss (their assistant tokens, none across a boundary), and a packed run
    stopped mid-way resumes bitwise."""
    import json

    from crosschip.training.data import Tokenization, collate, collate_packed, pack_groups, read_rows, tokenize
    from crosschip.training.tokenizer import HFTokenizer
    from helpers import save_chat_model, train_interrupted

    tok, _ = save_chat_model(tmp_path / "chat-model")
    rows = [{"messages": [{"role": "user", "content": f"What is {n} plus {n}?"},
                          {"role": "assistant", "content": f"{2 * n}."}]} for n in range(10)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = tokenize(read_rows(str(data)), HFTokenizer(tok), Tokenization(seq_len=128), str(data))
    groups = pack_groups([len(ids) for ids in dataset["input_ids"]], 128)
    assert len(groups) < len(dataset) and sorted(i for g in groups for i in g) == list(range(len(dataset)))
    packed = collate_packed(dataset, groups[:1], 128, tok.pad_token_id)
    alone = collate(dataset[groups[0]], 128, tok.pad_token_id)
    assert packed.targets == alone.targets  # every assistant token, and none across a boundary

    model = crosschip.from_pretrained(tmp_path / "chat-model", backend="torch")
    packed_loss = model(packed.input_ids, attention_mask=packed.attention_mask, labels=packed.labels,
                        document_ids=packed.document_ids, position_ids=packed.position_ids).loss
    padded_loss = model(alone.input_ids, attention_mask=alone.attention_mask, labels=alone.labels).loss
    assert_rel_close(packed_loss, padded_loss, TOL, "packed vs padded loss")

    args = dict(model=str(tmp_path / "chat-model"), data=str(data), packing=True, steps=4, batch_size=1,
                seq_len=128, lr=3e-3, seed=2)
    losses = train_interrupted(tmp_path, "packed", 2, **args)
    assert losses["half"] == losses["full"][:2] and losses["resumed"] == losses["full"]
