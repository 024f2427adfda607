"""`crosschip train --data`: text and chat datasets from local files, the loss on assistant
tokens exactly where the chat template puts them, a held-out split chosen by the seed, an
evaluation that is a plain forward, saves along the way, and one clear error per bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

import crosschip
from crosschip.training.data import IGNORE, Tokenization, collate, held_out, read_rows, tokenize
from crosschip.errors import ConfigurationError
from crosschip.training.tokenizer import ByteTokenizer, HFTokenizer
from crosschip.training.train import TrainArgs, train
from helpers import save_chat_model, save_hf_llama

SMALL = dict(batch_size=2, seq_len=48, lr=3e-3, seed=5)


def _conversation(n: int) -> list[dict]:
    turns = [{"role": "user", "content": f"What is {n} plus {n}?"},
             {"role": "assistant", "content": f"{2 * n}."}]
    if n % 2:  # some with a system prompt and a second exchange
        turns = [{"role": "system", "content": "Answer briefly."}, *turns,
                 {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    return turns


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chat_data_trains_on_the_templates_assistant_tokens_evaluates_and_keeps_the_last_saves(tmp_path):
    tok, _ = save_chat_model(tmp_path / "chat-model")
    data = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": _conversation(n)} for n in range(12)])

    # The mask against transformers' own account of the template's {% generation %} spans.
    rows = read_rows(str(data))
    for train_on in ("assistant", "all"):
        tokenized = tokenize(rows, HFTokenizer(tok), Tokenization(seq_len=256, train_on=train_on), str(data))
        assert len(tokenized) == 12
        for n, example in enumerate(tokenized):
            rendered = tok.apply_chat_template(_conversation(n), tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
            assert example["input_ids"] == list(rendered["input_ids"])
            expected = [i if m or train_on == "all" else IGNORE
                        for i, m in zip(rendered["input_ids"], rendered["assistant_masks"])]
            assert example["labels"] == expected, (n, train_on)
        if train_on == "assistant":  # the answers and the template's end-of-turn marks, nothing else
            assert tok.decode([i for i in tokenized[1]["labels"] if i != IGNORE],
                              skip_special_tokens=False) == "2.<|end|>Yes.<|end|>"

    # A user's own directory named like a save is never pruned.
    out = tmp_path / "out"
    (out / "checkpoint-0").mkdir(parents=True)
    (out / "checkpoint-0" / "notes.txt").write_text("mine")
    result = train(TrainArgs(model=str(tmp_path / "chat-model"), data=str(data), eval_fraction=0.25,
                             eval_every=2, save_every=1, keep_last=2, steps=4, out=str(out), **SMALL),
                   progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses))) and len(result.losses) == 4
    assert [e["step"] for e in result.evals] == [2, 4]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-0", "checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-0" / "notes.txt").read_text() == "mine"

    # The held-out rows: 3 of 12, chosen by the seed; the evaluation is a separate forward over them.
    kept, held = held_out(12, 0.25, SMALL["seed"])
    assert (kept, held) == held_out(12, 0.25, SMALL["seed"]) and len(held) == 3
    assert sorted(kept + held) == list(range(12)) and held_out(12, 0.25, SMALL["seed"] + 1)[1] != held
    evaluation = tokenize(read_rows(str(data)).select(held), HFTokenizer(tok), Tokenization(seq_len=48), str(data))
    batch = collate(evaluation[:], 48, tok.pad_token_id)
    for step, directory in ((2, out / "checkpoint-2"), (4, out)):
        model = crosschip.from_pretrained(directory).eval()
        with torch.no_grad():
            loss = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.item()
        got = next(e for e in result.evals if e["step"] == step)
        assert abs(got["loss"] - loss) <= 1e-5 * loss, (step, got, loss)
        assert abs(got["perplexity"] - torch.tensor(loss).exp().item()) <= 1e-4 * got["perplexity"]
    meta = json.loads((out / "checkpoint-3" / "training_state" / "meta.json").read_text())
    assert meta["step"] == 3 and len(meta["losses"]) == 3 and meta["losses"] == result.losses[:3]
    # A kept save resumes: to the same step-4 model as the run itself.
    again = train(TrainArgs(model=str(tmp_path / "chat-model"), resume=str(out / "checkpoint-3"), steps=4,
                            out=str(tmp_path / "again")), progress=False)
    assert again.losses == result.losses


def _text_rows():
    return [{"text": f"Document {n}: " + "words and more words " * (n % 4), "id": n} for n in range(9)]


def test_text_datasets_in_every_format_tokenize_alike_are_cached_and_train(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _text_rows()
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", rows)
    (tmp_path / "docs.json").write_text(json.dumps(rows))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "docs.parquet")
    with pa.ipc.new_stream(str(tmp_path / "docs.arrow"), table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "docs.txt").write_text("".join(row["text"] + "\n" for row in rows))
    options, byte = Tokenization(seq_len=128), ByteTokenizer()
    expected = [[byte.bos_token_id, *row["text"].encode(), byte.eos_token_id] for row in rows]
    for name in ("docs.jsonl", "docs.json", "docs.parquet", "docs.arrow", "docs.txt"):
        tokenized = tokenize(read_rows(str(tmp_path / name)), byte, options, name)
        assert list(tokenized["input_ids"]) == expected, name
        assert list(tokenized["labels"]) == expected, name

    # Tokenized once: the second read maps nothing and finds the same cache file untouched.
    first = tokenize(read_rows(str(jsonl)), byte, options, "docs.jsonl")
    cache = first.cache_files[0]["filename"]
    stamp = os.stat(cache).st_mtime_ns
    again = tokenize(read_rows(str(jsonl)), byte, options, "docs.jsonl")
    assert again.cache_files[0]["filename"] == cache and os.stat(cache).st_mtime_ns == stamp

    # Long documents are truncated or split, as asked, and counted in a warning.
    long_rows = read_rows(str(_write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 100}, {"text": "short"}])))
    with pytest.warns(UserWarning, match=r"1 of 2 documents were longer than --seq-len 40 and were truncated"):
        cut = tokenize(long_rows, byte, Tokenization(seq_len=40), "long.jsonl")
    assert [len(ids) for ids in cut["input_ids"]] == [40, 7]
    with pytest.warns(UserWarning, match=r"were split into pieces"):
        pieces = tokenize(long_rows, byte, Tokenization(seq_len=40, long_documents="split"), "long.jsonl")
    assert [len(ids) for ids in pieces["input_ids"]] == [40, 40, 22, 7]
    assert sum(pieces["input_ids"][:3], []) == [byte.bos_token_id, *b"x" * 100, byte.eos_token_id]

    save_hf_llama(tmp_path / "model", vocab_size=300)  # no tokenizer files: byte-level
    result = train(TrainArgs(model=str(tmp_path / "model"), data=str(tmp_path / "docs.parquet"), steps=3,
                             out=str(tmp_path / "out"), **SMALL), progress=False)
    assert len(result.losses) == 3 and result.losses[-1] < result.losses[0]


def test_bad_data_is_one_clear_error_naming_the_file_row_or_option(tmp_path):
    save_hf_llama(tmp_path / "byte-model", vocab_size=300)
    save_chat_model(tmp_path / "chat-model")
    chats = [{"messages": _conversation(n)} for n in range(3)]
    bad_role = [*chats[:2], {"messages": [{"role": "wizard", "content": "hi"}]}]
    files = {"nofield.jsonl": [{"body": "x"}], "chats.jsonl": chats, "badrole.jsonl": bad_role,
             "two.jsonl": [{"text": "a"}, {"text": "b"}]}
    for name, rows in files.items():
        _write_jsonl(tmp_path / name, rows)
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        ("byte-model", dict(data="nofield.jsonl"),
         r"nofield.jsonl: no field 'text' \(--text-field\) or 'messages' \(--messages-field\); its rows have body"),
        ("chat-model", dict(data="badrole.jsonl"), r"badrole.jsonl: row 3: message 1 has unknown role 'wizard'"),
        ("byte-model", dict(data="chats.jsonl"), r"chats.jsonl: holds chat messages, but the byte-level tokenizer "
                                                 r"has no chat template"),
        ("byte-model", dict(data="empty.jsonl"), r"--data .*empty.jsonl: the dataset is empty"),
        ("byte-model", dict(data="two.jsonl", eval_fraction=0.9), r"two.jsonl: --eval-fraction 0.9 of its 2 rows "
                                                                  r"leaves the training split empty"),
        ("byte-model", dict(data="two.jsonl", eval_data="empty.jsonl"), r"--eval-data .*empty.jsonl: the dataset is "
                                                                        r"empty"),
        ("byte-model", dict(data="missing.jsonl"), r"--data .*missing.jsonl: no such file"),
        ("byte-model", dict(data="two.jsonl", eval_every=2), r"--eval-every needs a validation split"),
        ("byte-model", dict(text="two.jsonl", eval_fraction=0.5), r"--eval-data and --eval-fraction apply only "
                                                                  r"with --data"),
    ]
    for model, given, message in cases:
        given = {k: str(tmp_path / v) if k in ("data", "eval_data", "text") else v for k, v in given.items()}
        with pytest.raises(ConfigurationError, match=message):
            train(TrainArgs(model=str(tmp_path / model), out=str(tmp_path / "never"), steps=2, **SMALL, **given),
                  progress=False)
        assert not (tmp_path / "never").exists(), message
    # A chat template missing from a real tokenizer, through the CLI: one line.
    config = json.loads((tmp_path / "chat-model" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "chat-model" / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in (tmp_path / "chat-model").glob("chat_template.*"):
        extra.unlink()
    from test_train import _cli

    result = _cli("train", "--model", str(tmp_path / "chat-model"), "--data", str(tmp_path / "chats.jsonl"),
                  "--steps", "1", "--out", str(tmp_path / "never"), "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "chats.jsonl: holds chat messages, but the model's tokenizer has no chat template" in result.stderr


def test_generate_chat_answers_as_transformers_does_from_the_template(tmp_path, capsys):
    """`crosschip generate --chat` renders the prompt as a user turn with the model's chat template
    and prints the greedy answer transformers gives from the same rendering."""
    from crosschip.cli import main
    from helpers import save_chat_model, save_hf_llama

    tok, hf = save_chat_model(tmp_path / "chat")
    assert main(["generate", "--model", str(tmp_path / "chat"), "--prompt", "Name a prime.", "--chat",
                 "--max-new-tokens", "6", "--backend", "torch"]) == 0
    got = capsys.readouterr().out.removesuffix("\n")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a prime."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = hf.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    assert got == tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    save_hf_llama(tmp_path / "plain", vocab_size=258)  # no tokenizer files: byte-level, no template
    assert main(["generate", "--model", str(tmp_path / "plain"), "--prompt", "hi", "--chat"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("crosschip: error: --chat: ") and "has no chat template (the byte-level tokenizer)" in last
