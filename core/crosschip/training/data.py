"""Fine-tuning data for ``crosschip train --data``: rows read through the ``datasets`` library,
tokenized once (cached in the datasets cache under a fingerprint of the data, the tokenizer and
every option that changes the tokens), and cut into padded batches.

Invariants: the examples of a step are a function of (seed, step) only, so a run stopped
anywhere (mid-epoch included) and resumed sees exactly the data an uninterrupted run sees; every
example keeps at least one trained token (labels -100 elsewhere), and whatever is truncated or
left out is counted in a warning, never dropped silently. Batches are built in one place,
:func:`collate`, or packed several to a row by :func:`collate_packed` (``--packing``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from crosschip.errors import ConfigurationError, CrosschipWarning
from crosschip.training.tokenizer import has_chat_template

IGNORE = -100  # the loss's ignore_index (LossSpec)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
#: file suffix -> the datasets builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
            ".arrow": "arrow"}
FORMAT_VERSION = 1  # part of the cache key: bump when the tokens of a row change meaning


@dataclass
class Batch:
    """``input_ids`` and ``labels`` ``[rows, seq]``; ``attention_mask`` 1 on real tokens (None:
    every token is real); ``targets``: how many labels the loss counts (after its shift). Packed
    rows also carry ``document_ids`` (the document of each position; -1 on padding) and
    ``position_ids`` restarting at each document."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    document_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def rows(self, part: slice) -> Batch:
        def cut(t):
            return None if t is None else t[part]

        return Batch(self.input_ids[part], self.labels[part], cut(self.attention_mask), cut(self.document_ids),
                     cut(self.position_ids))


# -- reading ------------------------------------------------------------------------------------
def read_rows(source: str, option: str = "--data"):
    """A ``datasets.Dataset`` of the rows of ``source``: a local file (by suffix), a directory
    written by ``Dataset.save_to_disk``, or else a Hub dataset id (its ``train`` split), which
    needs a network or the datasets cache."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()):
            rows = datasets.load_from_disk(str(path))
        elif path.is_file():
            if path.stat().st_size == 0:  # datasets fails on it with a bare StopIteration
                raise ConfigurationError(f"{option} {source}: the dataset is empty (an empty file)")
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigurationError(f"{option} {source}: unknown file type {path.suffix!r}; expected one of "
                                         f"{', '.join(sorted(BUILDERS))}")
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.suffix.lower() in BUILDERS or path.is_absolute() or source.startswith("."):
            raise ConfigurationError(f"{option} {source}: no such file")
        else:  # org/name: the Hub, through datasets' own cache and offline rules
            rows = datasets.load_dataset(source, split="train")
    except ConfigurationError:
        raise
    except Exception as exc:  # malformed JSON, an unreadable Parquet file, an unknown Hub id
        raise ConfigurationError(f"{option} {source}: could not be read as a dataset: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if isinstance(rows, datasets.DatasetDict):
        if "train" not in rows:
            raise ConfigurationError(f"{option} {source}: holds splits {', '.join(rows)}, none named 'train'")
        rows = rows["train"]
    if len(rows) == 0:
        raise ConfigurationError(f"{option} {source}: the dataset is empty (no rows)")
    return rows


def held_out(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: ``round(fraction * count)`` rows held out, chosen by a
    permutation drawn from ``seed`` alone, each list in file order."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7)).tolist()
    held = set(order[:round(fraction * count)])
    return [i for i in range(count) if i not in held], sorted(held)


# -- tokenizing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokenization:
    """Every option that changes the tokens of a row (and so the cache key)."""

    seq_len: int
    text_field: str = "text"
    messages_field: str = "messages"
    train_on: str = "assistant"  # chat rows: the loss on assistant tokens only, or "all"
    long_documents: str = "truncate"  # or "split" into seq_len pieces


def tokenize(rows, tokenizer, options: Tokenization, source: str, option: str = "--data", row_numbers=None):
    """``rows`` as a dataset of ``input_ids`` and ``labels``, each at most ``seq_len`` long.
    ``row_numbers``: each row's number in ``source`` (rows may be a held-out subset)."""
    from datasets.fingerprint import Hasher

    columns = set(rows.column_names)
    if options.text_field in columns:
        field, render = options.text_field, _text_row
    elif options.messages_field in columns:
        field, render = options.messages_field, _chat_row
        _check_chat_template(tokenizer, source, option)
    else:
        raise ConfigurationError(
            f"{option} {source}: no field {options.text_field!r} (--text-field) or {options.messages_field!r} "
            f"(--messages-field); its rows have {', '.join(sorted(columns))}")
    numbers = list(range(len(rows))) if row_numbers is None else list(row_numbers)
    counts = {"rows": 0, "cut": 0, "untrained": 0}

    def tokenize_rows(batch, indices):
        out = {"input_ids": [], "labels": []}
        for value, index in zip(batch[field], indices):
            ids, labels = render(value, tokenizer, options, f"{option} {source}: row {numbers[index] + 1}")
            for piece_ids, piece_labels in _fit(ids, labels, options, counts):
                out["input_ids"].append(piece_ids)
                out["labels"].append(piece_labels)
        return out

    fingerprint = Hasher.hash((rows._fingerprint, _tokenizer_key(tokenizer), options, field, FORMAT_VERSION))
    tokenized = rows.map(tokenize_rows, batched=True, with_indices=True, remove_columns=rows.column_names,
                         new_fingerprint=fingerprint, desc=f"tokenizing {Path(source).name}")
    if counts["cut"] or counts["untrained"]:  # only counted when it ran, not when read from the cache
        done = "truncated" if options.long_documents == "truncate" else "split into pieces"
        warnings.warn(f"{option} {source}: {counts['cut']} of {counts['rows']} documents were longer than "
                      f"--seq-len {options.seq_len} and were {done} (--long-documents); {counts['untrained']} "
                      "pieces without a trained token were left out", CrosschipWarning, stacklevel=2)
    if len(tokenized) == 0:
        raise ConfigurationError(f"{option} {source}: no example has a token to train on "
                                 f"(--train-on {options.train_on}, --seq-len {options.seq_len})")
    return tokenized


def _text_row(text, tokenizer, options: Tokenization, where: str):
    if not isinstance(text, str):
        raise ConfigurationError(f"{where}: field {options.text_field!r} holds {type(text).__name__}, expected text")
    ids = tokenizer.encode(text, add_bos=True)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def _chat_row(messages, tokenizer, options: Tokenization, where: str):
    check_messages(messages, where)
    ids, assistant = assistant_mask(tokenizer.tok, messages, where)
    if options.train_on == "all":
        return ids, list(ids)
    return ids, [i if keep else IGNORE for i, keep in zip(ids, assistant)]


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigurationError(f"{where}: messages must be a non-empty list of {{'role', 'content'}}")
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ConfigurationError(f"{where}: message {n} is not a {{'role', 'content'}} with text content")
        if message.get("role") not in ROLES:
            raise ConfigurationError(f"{where}: message {n} has unknown role {message.get('role')!r}; "
                                     f"expected one of {', '.join(sorted(ROLES))}")


def assistant_mask(tok, messages: list[dict], where: str = "messages") -> tuple[list[int], list[bool]]:
    """The tokens of ``messages`` rendered with ``tok``'s chat template, and which of them are
    assistant output. Each assistant turn's span runs from the end of the conversation before
    it, rendered with the generation prompt, to the end of the conversation through it: what
    the template itself adds for that turn, whatever its markup. Any template works that
    renders each conversation as a prefix of its continuation (one that rewrites earlier turns
    is refused)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for n, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=True) if n else ""
        through = tok.apply_chat_template(messages[:n + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigurationError(f"{where}: the chat template renders earlier turns differently once later "
                                     "ones follow, so the assistant tokens cannot be told apart; use --train-on all")
        spans.append((len(before), len(through)))
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def _check_chat_template(tokenizer, source: str, option: str) -> None:
    if not has_chat_template(tokenizer):
        kind = "the byte-level tokenizer" if getattr(tokenizer, "tok", None) is None else "the model's tokenizer"
        raise ConfigurationError(f"{option} {source}: holds chat messages, but {kind} has no chat template "
                                 "(give --model a directory whose tokenizer has one, or use --text-field)")


def _tokenizer_key(tokenizer) -> str:
    from datasets.fingerprint import Hasher

    tok = getattr(tokenizer, "tok", None)
    return Hasher.hash(tok) if tok is not None else f"{type(tokenizer).__name__}-{tokenizer.vocab_size}"


def _fit(ids: list[int], labels: list[int], options: Tokenization, counts: dict):
    """The ``seq_len`` pieces of one document that have a trained token (after the shift)."""
    counts["rows"] += 1
    n = options.seq_len
    if len(ids) > n:
        counts["cut"] += 1
    starts = range(0, len(ids), n) if options.long_documents == "split" else [0]
    for start in starts:
        piece_ids, piece_labels = ids[start:start + n], labels[start:start + n]
        if any(label != IGNORE for label in piece_labels[1:]):
            yield piece_ids, piece_labels
        else:
            counts["untrained"] += 1


# -- batches ------------------------------------------------------------------------------------
def step_indices(step: int, rows_per_step: int, count: int, seed: int) -> list[int]:
    """The example indices of ``step``: positions ``step * rows_per_step ...`` of an endless
    sequence of epochs, each epoch a permutation drawn from (seed, epoch) alone."""
    first = step * rows_per_step
    out = []
    for position in range(first, first + rows_per_step):
        epoch, offset = divmod(position, count)
        out.append(_permutation(seed, epoch, count)[offset])
    return out


_PERMUTATIONS: dict = {}


def _permutation(seed: int, epoch: int, count: int) -> list[int]:
    key = (seed, epoch, count)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 4:
            _PERMUTATIONS.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * epoch)
        _PERMUTATIONS[key] = torch.randperm(count, generator=gen).tolist()
    return _PERMUTATIONS[key]


def collate(examples: dict, seq_len: int, pad_id: int) -> Batch:
    """Examples (``{"input_ids": [...], "labels": [...]}`` columns) padded on the right to
    ``seq_len``: one shape every step (trace-friendly), padding masked out and ignored by the
    loss. Right padding under a causal mask leaves the real tokens' outputs unchanged."""
    rows = len(examples["input_ids"])
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((rows, seq_len), dtype=torch.long)
    for r, (ids, labs) in enumerate(zip(examples["input_ids"], examples["labels"])):
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[r, :len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[r, :len(ids)] = 1
    return Batch(input_ids, labels, mask)


def pack_groups(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Examples (by index, in dataset order) grouped greedily into rows of at most ``seq_len``
    tokens: the packed rows a ``--packing`` run samples its steps from, a function of the data
    alone (so of (seed, step) once sampled, as unpacked examples are)."""
    groups: list[list[int]] = []
    used = seq_len
    for index, length in enumerate(lengths):
        if used + length > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


def collate_packed(dataset, groups: list[list[int]], seq_len: int, pad_id: int) -> Batch:
    """One row per group: its examples side by side, each its own document (attention stays
    within it, positions restart), the first label of every later document -100 (so no
    document predicts the next one's first token), padding after the last."""
    rows = len(groups)
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((rows, seq_len), dtype=torch.long)
    documents = torch.full((rows, seq_len), -1, dtype=torch.long)
    positions = torch.zeros((rows, seq_len), dtype=torch.long)
    for r, group in enumerate(groups):
        examples, start = dataset[group], 0
        for d, (ids, labs) in enumerate(zip(examples["input_ids"], examples["labels"])):
            span = slice(start, start + len(ids))
            input_ids[r, span], labels[r, span] = torch.tensor(ids), torch.tensor(labs)
            if d:
                labels[r, start] = IGNORE
            mask[r, span], documents[r, span] = 1, d
            positions[r, span] = torch.arange(len(ids))
            start += len(ids)
    return Batch(input_ids, labels, mask, documents, positions)


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(getattr(tokenizer, "tok", tokenizer), name, None)
        if isinstance(value, int):
            return value
    return 0  # never seen by the loss or by attention


# -- a run's splits -----------------------------------------------------------------------------
def training_splits(args, tokenizer):
    """(train, eval or None) tokenized datasets for ``TrainArgs`` ``args`` with ``--data``: the
    eval split is ``--eval-data``, or ``--eval-fraction`` of the rows held out by the seed."""
    options = Tokenization(seq_len=args.seq_len, text_field=args.text_field, messages_field=args.messages_field,
                           train_on=args.train_on, long_documents=args.long_documents)
    rows = read_rows(args.data)
    train_rows, eval_rows = rows, None
    numbers = None
    if args.eval_fraction:
        train_numbers, eval_numbers = held_out(len(rows), args.eval_fraction, args.seed)
        for name, picked in (("training", train_numbers), ("evaluation", eval_numbers)):
            if not picked:
                raise ConfigurationError(f"--data {args.data}: --eval-fraction {args.eval_fraction} of its "
                                         f"{len(rows)} rows leaves the {name} split empty")
        train_rows, eval_rows = rows.select(train_numbers), rows.select(eval_numbers)
        numbers = train_numbers
        evaluation = tokenize(eval_rows, tokenizer, options, args.data, row_numbers=eval_numbers)
    elif args.eval_data:
        evaluation = tokenize(read_rows(args.eval_data, "--eval-data"), tokenizer, options, args.eval_data,
                              option="--eval-data")
    else:
        evaluation = None
    return tokenize(train_rows, tokenizer, options, args.data, row_numbers=numbers), evaluation
