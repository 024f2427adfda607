"""The main job: train a causal LM on the built-in corpus, a text file or a dataset
(``--data``, see :mod:`crosschip.data`), on any backend, and save a Hugging Face checkpoint with
everything needed to resume (and, with ``--save-every``, intermediate ones: see
:mod:`crosschip.periodic_saves`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosschip import hub, local_shards, periodic_saves
from crosschip.data import Batch, collate, pad_id, step_indices, training_splits
from crosschip.distributed import DP_DIM
from crosschip.checkpoint import safe_dcp
from crosschip.checkpoint.lock import output_lock
from crosschip.checkpoint.transaction import atomic_save, committed_directory, holds_checkpoint, manifest
from crosschip.errors import CheckpointError, ConfigurationError, TrainingDivergedError
from crosschip.init import init_weights
from crosschip.loading import build_model, finalize, from_pretrained
from crosschip.metrics import StepMetrics, parse_log, peak_memory_bytes
from crosschip.models import model_class
from crosschip.presets import preset_config
from crosschip.resume import read_meta, recorded, resumed_args
from crosschip.runtime import Runtime
from crosschip.schedule import SCHEDULES, learning_rate
from crosschip.specs import ParallelSpec
from crosschip.tokenizer import ByteTokenizer, check_vocab_fits, load_tokenizer

STATE_DIR = "training_state"  # torch.distributed.checkpoint of model and optimizer, any layout
STATE_META = "meta.json"


@dataclass
class TrainArgs:
    model: str = "tiny-llama"
    backend: str | None = None
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    out: str = "crosschip-out"
    resume: str | None = None
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    precision: str = "auto"  # "fp8": FP8 matmuls on a backend that implements them (te)
    fp8_recipe: str = "delayed"
    activation_checkpointing: str = "none"
    text: str | None = None  # a UTF-8 text file to train on instead of the built-in corpus
    # A dataset (local JSONL, JSON, Parquet, text or Arrow file, or a Hub id) of text or chat rows.
    data: str | None = None
    text_field: str = "text"
    messages_field: str = "messages"  # chat rows: a list of {"role", "content"}
    train_on: str = "assistant"  # chat rows: the loss on assistant tokens only, or "all"
    long_documents: str = "truncate"  # documents longer than seq_len: "truncate" or "split"
    eval_data: str | None = None  # the validation split: a file, or ...
    eval_fraction: float = 0.0  # ... this fraction of --data's rows held out (chosen by the seed)
    eval_every: int | None = None  # evaluate every N steps (and at the end, whenever there is a split)
    warmup: int | None = None
    lr_schedule: str = "cosine"  # after the warm-up: "cosine" or "linear" to lr / 10, or "constant"
    grad_accumulation: int = 1  # micro-batches of batch_size per optimizer step
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    save_every: int | None = None  # also save out/checkpoint-<step> every N steps ...
    keep_last: int | None = None  # ... keeping only the K newest of this run's
    stop_after: int | None = None  # stop and save after this many steps of this run (resume later)
    tp: int = 1  # tensor parallel degree (launch with torchrun --nproc_per_node tp * dp)
    dp: int = 1  # data parallel degree (FSDP2); each dp rank trains on batch_size / dp sequences
    sequence_parallel: bool = False  # with tp > 1: norms and residuals sharded along the sequence
    # Losses are read back from the device (a host sync on accelerators) every this many steps:
    # for the progress bar and the divergence check.
    log_every: int = 10
    # With resume: run-defining arguments that may differ from the saved run, "name=value"
    # (several per item, comma-separated); see crosschip.resume.
    override: list[str] | None = None
    overwrite: bool = False  # replace a checkpoint in `out` that this run did not start from
    revision: str | None = None  # with a Hub model id as `model`: a branch, tag or commit
    log: str | None = None  # "tensorboard,wandb": also send step metrics there (metrics.jsonl always)

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "grad_accumulation"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"--{name.replace('_', '-')} must be positive, found {getattr(self, name)}")
        for name in ("stop_after", "eval_every", "save_every", "keep_last"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigurationError(f"--{name.replace('_', '-')} must be positive, found {getattr(self, name)}")
        self._check_data()
        if self.lr_schedule not in SCHEDULES:
            raise ConfigurationError(f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise ConfigurationError(f"--weight-decay and --max-grad-norm must be >= 0, found {self.weight_decay} "
                                     f"and {self.max_grad_norm}")
        if self.keep_last is not None and self.save_every is None:
            raise ConfigurationError("--keep-last applies only with --save-every")
        if not self.lr > 0:
            raise ConfigurationError(f"--lr must be positive, found {self.lr}")
        if self.tp <= 0 or self.dp <= 0:
            raise ConfigurationError(f"--tp and --dp must be positive, found --tp {self.tp} --dp {self.dp}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigurationError(f"--out {out}: exists and is not a directory (expected a directory "
                                     "to save the checkpoint into)")
        if self.batch_size % self.dp:
            raise ConfigurationError(f"--batch-size {self.batch_size} is not divisible by --dp {self.dp}: each "
                                     "data-parallel rank trains on an equal part of every batch")
        if self.device is not None:
            from crosschip.runtime import parse_device

            parse_device(self.device, where="--device")
        parse_log(self.log)


    def _check_data(self) -> None:
        choices = {"train_on": ("assistant", "all"), "long_documents": ("truncate", "split")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigurationError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected one of "
                                         f"{', '.join(valid)}")
        if self.data and self.text:
            raise ConfigurationError("--data and --text both name the training data; give one")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigurationError(f"--eval-fraction must be in [0, 1), found {self.eval_fraction}")
        if self.eval_fraction and self.eval_data:
            raise ConfigurationError("--eval-data and --eval-fraction both name the validation split; give one")
        if (self.eval_fraction or self.eval_data) and not self.data:
            raise ConfigurationError("--eval-data and --eval-fraction apply only with --data")
        if self.eval_every is not None and not (self.eval_fraction or self.eval_data):
            raise ConfigurationError("--eval-every needs a validation split: --eval-data or --eval-fraction")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    out: Path | None = None
    model: object = None
    evals: list[dict] = field(default_factory=list)  # {"step", "loss", "perplexity"} on the validation split
    saves: list[Path] = field(default_factory=list)  # the intermediate saves this run wrote


def batch_for_step(tokens: torch.Tensor, step: int, args: TrainArgs, rows: int | None = None) -> torch.Tensor:
    """The ``rows`` (default ``batch_size``) sequences of a step depend only on (seed, step): an
    interrupted and resumed run sees the same data in the same order. The first ``batch_size``
    of a larger draw are the smaller draw's, so N micro-batches are one batch of N*B."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - args.seq_len, (rows or args.batch_size,), generator=gen)
    return torch.stack([tokens[s:s + args.seq_len] for s in starts.tolist()])


class StepData:
    """The whole batch of each step (``grad_accumulation * batch_size`` rows): from the corpus
    (every token a label, no padding) or from ``--data`` (:mod:`crosschip.data`); either way a
    function of (seed, step). ``evaluation``: the validation split's dataset, or None."""

    def __init__(self, args: TrainArgs, tokenizer):
        self.args, self.rows = args, args.batch_size * args.grad_accumulation
        self.pad = pad_id(tokenizer)
        self.evaluation = None
        if args.data:
            self.dataset, self.evaluation = training_splits(args, tokenizer)
        else:
            self.tokens = _corpus_tokens(args, tokenizer)

    def __call__(self, step: int) -> Batch:
        if not self.args.data:
            ids = batch_for_step(self.tokens, step, self.args, self.rows)
            return Batch(ids, ids, None)
        indices = step_indices(step, self.rows, len(self.dataset), self.args.seed)
        return collate(self.dataset[indices], self.args.seq_len, self.pad)

    def evaluation_batches(self):
        for start in range(0, len(self.evaluation), self.args.batch_size):
            yield collate(self.evaluation[start:start + self.args.batch_size], self.args.seq_len, self.pad)


def _corpus_tokens(args: TrainArgs, tokenizer) -> torch.Tensor:
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ConfigurationError(f"--text {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"--text {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                     "expected a text file") from None
    else:
        from crosschip.corpus import generate_corpus

        text = generate_corpus(seed=args.seed)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < args.seq_len + 2:
        raise ConfigurationError(f"the corpus has {len(ids)} tokens, fewer than --seq-len {args.seq_len} + 2")
    return ids


def _build(args: TrainArgs, state: dict | None, resumed: Path | None):
    """Model and tokenizer for a fresh run, or for resuming the run whose ``meta.json`` is
    ``state``, read from ``resumed`` (the committed directory of ``--resume``, resolved once, so
    that weights, tokenizer and training state come from one save)."""
    source = str(resumed) if resumed is not None else args.model
    if resumed is None and (cached := hub.resolve(args.model, args.revision, option="--model")):
        source = str(cached)  # a local directory, or the cached snapshot of a Hub model id
    if Path(source).is_dir():
        model = from_pretrained(source, backend=args.backend, device=args.device, dtype=args.dtype,
                                precision=args.precision, fp8_recipe=args.fp8_recipe,
                                activation_checkpointing=args.activation_checkpointing, tp=args.tp,
                                dp=args.dp, sequence_parallel=args.sequence_parallel)
        tokenizer = load_tokenizer(source)
    else:
        config = preset_config(args.model)
        runtime = Runtime(args.backend, device=args.device, dtype=args.dtype, precision=args.precision,
                          fp8_recipe=args.fp8_recipe, activation_checkpointing=args.activation_checkpointing,
                          parallel=ParallelSpec(tp=args.tp, dp=args.dp,
                                                sequence_parallel=args.sequence_parallel))
        model = build_model(model_class(config.architectures[0]), config, runtime)
        init_weights(model, seed=args.seed, std=config.initializer_range)
        finalize(model)
        tokenizer = ByteTokenizer()
    if state is not None:
        backends = _backends(model)
        if state["backends"] != backends:
            raise ConfigurationError(
                f"--resume {args.resume}: optimizer state was saved with backends {state['backends']}, "
                f"this run builds {backends}; resume on the same backend")
    check_vocab_fits(tokenizer, model.opts.vocab_size, where=source)
    return model.train(), tokenizer


def _resumed_state(args: TrainArgs) -> tuple[dict | None, Path | None]:
    """The saved run's ``meta.json`` and the committed directory it was read from (None, None
    for a fresh run). Its save id must be the weights': a state copied from another save is a
    mixed checkpoint."""
    if not args.resume:
        return None, None
    resumed = committed_directory(args.resume) if Path(args.resume).is_dir() else Path(args.resume)
    meta_file = resumed / STATE_DIR / STATE_META
    state = read_meta(args.resume, meta_file)
    saved = manifest(args.resume)
    if saved is not None and not saved.get("adopted") and state.get("save_id") != saved["save_id"]:
        raise CheckpointError(f"{meta_file}: belongs to save {state.get('save_id')}, but the weights beside "
                              f"it to save {saved['save_id']}; refusing a mixed checkpoint")
    return state, resumed


def check_output(args: TrainArgs) -> None:
    """Refuse, before any training, to replace a checkpoint in ``--out`` that this run did not
    start from (``--resume`` or ``--model`` naming it), unless ``--overwrite``."""
    out = Path(args.out)
    if args.overwrite or not out.is_dir() or not holds_checkpoint(out):
        return
    started_from = {os.path.realpath(p) for p in (args.resume, args.model) if p and Path(p).is_dir()}
    # A resume from one of the run's own intermediate saves may replace the run's final save.
    same_run = bool(args.resume) and periodic_saves.run_id_of(Path(args.resume)) is not None and \
        periodic_saves.run_id_of(out) == periodic_saves.run_id_of(Path(args.resume))
    if os.path.realpath(out) not in started_from and not same_run:
        raise ConfigurationError(f"--out {out}: already holds a checkpoint that this run did not start from; "
                                 "pass --overwrite to replace it, or choose another --out")


def _layouts(model) -> dict[str, str]:
    """``backend:component`` -> the weight layout its modules hold (its transforms' repr)."""
    from crosschip.weights import bindings

    found: dict[str, set] = {}
    for b in bindings(model):
        found.setdefault(f"{b.info.backend}:{b.info.component}", set()).add(repr(b.transform))
    return {k: " | ".join(sorted(v)) for k, v in sorted(found.items())}


def _backends(model) -> dict[str, list[str]]:
    return {k: sorted(v["backend"] for v in entries) for k, entries in model.runtime.report.summary().items()}


def train(args: TrainArgs, progress: bool = True) -> TrainResult:
    """Train, then save weights, tokenizer and training state as one atomic save into
    ``args.out``, which rank 0 holds locked from before the first step to the end of the save
    (bad input is refused before that: it leaves no trace in ``--out``)."""
    args.check()
    state, resumed = _resumed_state(args)
    args = resumed_args(args, state["args"] if state else None)  # --override applied
    check_output(args)
    _ensure_process_group(args)
    return _train(args, state, resumed, progress)


@contextlib.contextmanager
def _locked_output(args: TrainArgs):
    """Rank 0 holds the output lock and re-checks the output under it (another run may have
    saved there meanwhile); every rank learns the outcome, so none trains alone."""
    failure = None
    with contextlib.ExitStack() as stack:
        if _rank() == 0:
            try:
                stack.enter_context(output_lock(args.out))
                check_output(args)
            except Exception as exc:
                failure = exc
        if args.tp * args.dp > 1:
            import torch.distributed as dist

            outcome = [None if failure is None else (type(failure).__name__, str(failure))]
            dist.broadcast_object_list(outcome, src=0)
            if outcome[0] is not None and failure is None:
                kind = ConfigurationError if outcome[0][0] == "ConfigurationError" else CheckpointError
                failure = kind(outcome[0][1])
        if failure is not None:
            raise failure
        yield


def _train(args: TrainArgs, state: dict | None, resumed: Path | None, progress: bool) -> TrainResult:
    torch.manual_seed(args.seed)
    model, tokenizer = _build(args, state, resumed)
    device = model.runtime.device
    data = StepData(args, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    start, losses = 0, []
    # One id for the whole run, kept across resumes: --keep-last removes only this run's saves.
    run_id = (state or {}).get("run_id") or uuid.uuid4().hex
    if state is not None:
        _load_training_state(model, optimizer, resumed / STATE_DIR, state, run_at=(args.tp, args.dp),
                             resume=args.resume)
        start, losses = state["step"], list(state["losses"])
    if start >= args.steps:
        raise ConfigurationError(f"--resume {args.resume} is already at step {start}; ask for --steps > {start}")
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    if args.save_every and _rank() == 0:
        periodic_saves.check_targets(args.out, _save_steps(args, start, end), run_id, args.overwrite)
    with _locked_output(args):
        return _steps_and_save(args, model, tokenizer, optimizer, data, start, end, losses, run_id, progress)


def _save_steps(args: TrainArgs, start: int, end: int) -> list[int]:
    """The steps after which this run writes ``checkpoint-<step>`` (the last one goes to ``out``)."""
    return [s for s in range(start + 1, end) if s % args.save_every == 0] if args.save_every else []


def _steps_and_save(args, model, tokenizer, optimizer, data: StepData, start: int, end: int, losses: list,
                    run_id: str, progress: bool):
    from tqdm.auto import tqdm

    device = model.runtime.device
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(losses=losses, out=Path(args.out), model=model)
    saves_at = set(_save_steps(args, start, end))

    bar = tqdm(range(start, end), initial=start, total=args.steps, disable=not progress or _rank() != 0,
               desc="train", unit="step", dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss, gradient norm) not yet read back
    metrics = StepMetrics(args.out, sinks=parse_log(args.log), resume=args.resume, start=start,
                          config=recorded(args), enabled=_rank() == 0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss, tokens = _accumulated_step(model, data(step), args, device)
        grad_norm = clip_gradients(params, args.max_grad_norm or float("inf"))  # inf: measured, not clipped
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.runtime.step_boundary()  # a lazily executing device (XLA) runs the step's graph here
        pending.append((_mean_over_data_parallel(loss, model), grad_norm.detach()))
        seen += tokens
        if len(pending) == args.log_every or step + 1 == end or step + 1 in saves_at:
            values, norms = _read_back(pending, step + 2 - len(pending), args)  # raises on divergence
            losses += values
            pending = []
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            metrics.log(step + 1, {"loss": values[-1], "lr": learning_rate(step, args), "grad_norm": norms[-1],
                                   "tokens_per_s": rate, "peak_memory_bytes": peak_memory_bytes(device)})
        if data.evaluation is not None and ((args.eval_every and (step + 1) % args.eval_every == 0)
                                            or step + 1 == end):
            result.evals.append({"step": step + 1, **evaluate(model, data, device)})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", eval_loss=f"{result.evals[-1]['loss']:.3f}")
        if step + 1 in saves_at:
            target = periodic_saves.checkpoint_dir(args.out, step + 1)
            _save(target, model, tokenizer, optimizer, step + 1, losses, args, run_id)
            result.saves.append(target)
            if _rank() == 0:
                periodic_saves.prune(args.out, run_id, args.keep_last)
            _barrier()
    bar.close()
    metrics.close()

    # Weights, tokenizer and training state: one save, committed only when every rank wrote its part.
    _save(args.out, model, tokenizer, optimizer, end, losses, args, run_id)
    result.tokens_per_second = seen / max(time.perf_counter() - t0, 1e-9)
    return result


def _save(directory, model, tokenizer, optimizer, step: int, losses: list, args: TrainArgs, run_id: str) -> None:
    with atomic_save(directory, distributed=model._parallel()) as staging:
        model.write_pretrained(staging, extra_files=tokenizer.save_pretrained)
        _save_training_state(model, optimizer, staging / STATE_DIR, {
            "step": step, "losses": list(losses), "args": recorded(args), "backends": _backends(model),
            "layouts": _layouts(model), "tp": args.tp, "dp": args.dp, "run_id": run_id,
            "save_id": staging.name.removeprefix("save-")})


def _accumulated_step(model, whole: Batch, args: TrainArgs, device) -> tuple[torch.Tensor, int]:
    """Forward and backward of one optimizer step's batch in ``grad_accumulation`` micro-batches
    of ``batch_size`` rows; the (device) loss of the whole batch and its token count.

    The loss is the mean over every counted label of the whole batch, as one big batch would
    take it: each micro-batch's (and data-parallel rank's) mean is weighted by its share of the
    counted labels (times dp, since data parallelism averages the ranks' gradients). Counts come
    from the host-side labels: no host sync. With one micro-batch and every token counted (the
    built-in corpus) the weight is exactly 1 and the step is the one it always was."""
    total, dp = whole.targets, args.dp
    step_loss, tokens = None, 0
    for micro in range(args.grad_accumulation):
        part = _data_parallel_part(whole.rows(slice(micro * args.batch_size, (micro + 1) * args.batch_size)),
                                   model)
        weight = part.targets * dp / total
        ids, labels = _to_device(part.input_ids, device), _to_device(part.labels, device)
        mask = None if part.attention_mask is None else _to_device(part.attention_mask, device)
        # The loss component shifts the labels, as transformers does.
        loss = model(ids, attention_mask=mask, labels=labels, return_logits=False).loss
        if weight != 1.0:
            loss = loss * weight
        loss.backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        tokens += (part.input_ids.numel() if mask is None else int(part.attention_mask.sum())) * dp
    return step_loss, tokens


def evaluate(model, data: StepData, device) -> dict:
    """Mean loss over every counted label of the validation split, and its perplexity. Every
    rank runs every batch (a data-parallel model's forward is collective), so no reduction is
    needed; one host sync at the end."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in data.evaluation_batches():
            loss = model(_to_device(batch.input_ids, device), attention_mask=_to_device(batch.attention_mask, device),
                         labels=_to_device(batch.labels, device), return_logits=False).loss
            total[0] += loss.double() * batch.targets
            total[1] += batch.targets
    model.train()
    mean = (total[0] / total[1]).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy from pageable host memory waits for the device to finish its queued work (a host
    sync per step); one from pinned memory is queued behind it instead."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _read_back(pending: list[tuple[torch.Tensor, torch.Tensor]], first_step: int, args: TrainArgs):
    """The losses and gradient norms of the ``pending`` steps (``first_step`` counts from 1), read
    from the device in one host sync. A NaN or infinite loss or gradient norm stops the run before anything is
    saved, so ``--out`` keeps its last good checkpoint: the next optimizer step after a
    non-finite gradient writes NaN into every weight."""
    values, norms = torch.stack([torch.stack([loss.float(), norm.float().to(loss.device)])
                                 for loss, norm in pending], dim=1).tolist()
    for step, (loss, norm) in enumerate(zip(values, norms), start=first_step):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingDivergedError(
                f"training diverged at step {step} of {args.steps}: loss {loss}, gradient norm {norm}; stopped "
                f"without saving, so {args.out} keeps its previous checkpoint, if any (resume from a good save "
                "with a lower --lr, e.g. --override lr=...)", step, loss, norm)
    return values, norms


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Scale gradients to a total 2-norm of at most ``max_norm``. Under tensor or data
    parallelism gradients are DTensors on a ``(dp, tp)`` mesh, sharded on some of its dims and
    replicated on others, possibly beside plain replicated tensors, which torch's
    ``clip_grad_norm_`` cannot mix. Each gradient's local squares are summed over the whole mesh
    and divided by the number of ranks holding the same values (the product of its replicated
    dims); a plain gradient counts once. A parameter whose rows replicate one another (KV heads
    copied where tp exceeds them) carries ``crosschip_row_copies(global_rows) -> copies``, and
    each row counts once."""
    params = [p for p in params if p.grad is not None]
    grads = local_shards.gradients(params)  # a backend's local shards as DTensor views
    copies_of = {id(g): p.crosschip_row_copies for p, g in zip(params, grads)
                 if hasattr(p, "crosschip_row_copies")}
    sharded = [g for g in grads if hasattr(g, "device_mesh")]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    plain = [g for g in grads if not hasattr(g, "device_mesh")]
    total = torch.zeros((), dtype=torch.float32, device=sharded[0].to_local().device)
    for g in plain:
        total += g.float().pow(2).sum()
    by_mesh: dict = {}
    for g in sharded:
        copies = 1
        for dim, placement in enumerate(g.placements):
            if isinstance(placement, Replicate):
                copies *= g.device_mesh.size(dim)
        by_mesh.setdefault(g.device_mesh, []).append(_squares(g, copies_of.get(id(g))) / copies)
    for mesh, squares in by_mesh.items():
        part = torch.stack(squares).sum()
        for dim in range(mesh.ndim):  # summed along each dim in turn: over every rank of the mesh
            dist.all_reduce(part, group=mesh.get_group(dim))
        total += part
    norm = total.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:  # a shard scaled in place through its local view: no host sync per gradient
        (g.to_local() if hasattr(g, "device_mesh") else g).mul_(scale.to(g.dtype))
    return norm


def _squares(grad, row_copies) -> torch.Tensor:
    """Sum of squares of this rank's part of ``grad``, each row divided by its number of copies."""
    local = grad.to_local().float()
    if row_copies is None:
        return local.pow(2).sum()
    from crosschip.sharded_load import local_region

    (start, stop), *_ = local_region(grad)
    per_row = local.pow(2).reshape(local.shape[0], -1).sum(dim=1)
    return (per_row / row_copies(torch.arange(start, stop, device=per_row.device))).sum()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _data_parallel_part(batch: Batch, model) -> Batch:
    """This data-parallel rank's equal share of the global batch (all of it without dp)."""
    dp = model.runtime.parallel.dp
    if dp == 1:
        return batch
    rank = model.runtime.device_mesh.get_local_rank(DP_DIM)
    share = len(batch.input_ids) // dp
    return batch.rows(slice(rank * share, (rank + 1) * share))


def _mean_over_data_parallel(loss: torch.Tensor, model) -> torch.Tensor:
    """The global batch's loss: the mean of the data-parallel ranks' (equal-sized) batch losses."""
    if model.runtime.parallel.dp == 1:
        return loss
    import torch.distributed as dist

    mesh = model.runtime.device_mesh
    loss = loss.clone()
    dist.all_reduce(loss, group=mesh.get_group(DP_DIM))
    return loss / model.runtime.parallel.dp


def _ensure_process_group(args: TrainArgs) -> None:
    """Under torchrun (``--tp`` or ``--dp`` > 1), join the process group torchrun describes."""
    size = args.tp * args.dp
    if size == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ConfigurationError(f"--tp {args.tp} --dp {args.dp} needs {size} processes, one per rank: "
                                     f"launch with `torchrun --nproc_per_node {size} -m crosschip.cli train ...`")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        elif device.startswith("xla"):  # Trainium: one process per NeuronCore, XLA's collectives
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

            dist.init_process_group("xla", init_method="xla://")
        else:
            dist.init_process_group("gloo")


def _save_training_state(model, optimizer, directory: Path, meta: dict) -> None:
    """Model and optimizer through torch.distributed.checkpoint (each rank writes its shards; a
    later run may load them at another layout), then the metadata, written last: a save that did
    not finish has no meta.json and is refused on resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optim": local_shards.optimizer_state_views(model, optim_state)},
                 checkpoint_id=str(directory))
    if _rank() == 0:
        (directory / STATE_META).write_text(json.dumps(meta, indent=1) + "\n")
    _barrier()


def _load_training_state(model, optimizer, directory: Path, meta: dict, run_at=(1, 1), resume=None) -> None:
    resume = resume or directory.parent
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    saved_at = (meta.get("tp", 1), meta.get("dp", 1))
    _check_state_fits(model_state, directory, saved_at, run_at)
    # The state holds physical weights: a layout that depends on the parallel degree (te's
    # gate/up blocks per TP rank) orders them differently at another layout, shapes alike.
    layouts = _layouts(model)
    if meta.get("layouts", layouts) != layouts:
        changed = sorted(k for k in layouts if meta["layouts"].get(k) != layouts[k])
        raise ConfigurationError(
            f"--resume {resume}: its training state holds the weights of {', '.join(changed)} "
            f"in another physical layout than this run builds (saved at tp={saved_at[0]}, dp={saved_at[1]}; "
            f"this run has tp={run_at[0]}, dp={run_at[1]}); resume at the saved layout, or start from the "
            "Hugging Face checkpoint in that directory (--model)")
    state = {"model": model_state, "optim": local_shards.optimizer_state_views(model, optim_state)}
    try:
        with _single_process_is_intended():
            safe_dcp.load(state, directory)
    except CheckpointError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"--resume {resume}: the saved training state does not fit this "
                                 f"model and layout: {exc}") from exc
    # optim_state was filled in place through the views.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state)


def _check_state_fits(model_state: dict, directory: Path, saved_at=(1, 1), run_at=(1, 1)) -> None:
    """The saved model state must have this model's weights at this model's (global) shapes,
    whatever layout either was sharded in; otherwise say which, with both shapes. (Global
    physical shapes depend on the layout only where KV heads are replicated, tp > KV heads.)"""
    try:
        saved = safe_dcp.read_metadata_file(directory / ".metadata").state_dict_metadata
    except CheckpointError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"{directory}: not a readable training state: {exc}") from exc
    saved = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    problems = []
    for name, tensor in model_state.items():
        entry = saved.get(name)
        if entry is None:
            problems.append(f"{name} is missing there")
        elif hasattr(entry, "size") and tuple(entry.size) != tuple(tensor.shape):
            problems.append(f"{name} has shape {tuple(entry.size)} there, {tuple(tensor.shape)} in this model")
    problems += [f"{name} is there but not in this model" for name in saved if name not in model_state]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        listed = f"{'; '.join(problems[:3])}{more}"
        if tuple(saved_at) != tuple(run_at):
            raise ConfigurationError(
                f"{directory}: this training state does not fit this model: {listed}; it was saved at "
                f"tp={saved_at[0]}, dp={saved_at[1]} and this run has tp={run_at[0]}, dp={run_at[1]} (a "
                "different model, or KV heads replicated where tp exceeds them, which resume only at "
                "the same tp; the Hugging Face checkpoint in that directory loads at any layout)")
        raise ConfigurationError(f"{directory}: this training state was saved by a different model: {listed}")


@contextlib.contextmanager
def _single_process_is_intended():
    """torch.distributed.checkpoint warns when no process group exists; one process is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
