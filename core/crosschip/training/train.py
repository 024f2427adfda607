"""The main job: train a causal LM on the built-in corpus, a text file or a dataset
(``--data``, see :mod:`crosschip.training.data`), on any backend, and save a Hugging Face checkpoint with
everything needed to resume (and, with ``--save-every``, intermediate ones: see
:mod:`crosschip.training.periodic_saves`)."""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosschip.checkpoint import hub

from crosschip.training import periodic_saves
from crosschip.checkpoint.lock import output_lock
from crosschip.checkpoint.transaction import atomic_save, committed_directory, holds_checkpoint, manifest
from crosschip.training import in_backward
from crosschip.training.clipping import GradientSquares, clip_gradients
from crosschip.training.data import Batch, collate, collate_packed, pack_groups, pad_id, step_indices, training_splits
from crosschip.parallel.distributed import DP_DIM, barrier
from crosschip.parallel.distributed import rank as _rank
from crosschip.errors import CheckpointError, ConfigurationError, TrainingDivergedError
from crosschip.weights.init import init_weights
from crosschip.checkpoint.loading import build_model, finalize, from_pretrained
from crosschip.training.metrics import StepMetrics, parse_log, peak_memory_bytes
from crosschip.models import model_class
from crosschip.training.presets import preset_config
from crosschip.training.resume import normalised, read_meta, recorded, resumed_args
from crosschip.runtime import Runtime
from crosschip.training.schedule import learning_rate
from crosschip.specs import ParallelSpec
from crosschip.training.tokenizer import ByteTokenizer, check_vocab_fits, load_tokenizer
from crosschip.training.train_args import TrainArgs
from crosschip.modeling.compilation import compile_model
from crosschip.parallel.distributed import join_launched_group
from crosschip.training.training_state import STATE_DIR, STATE_META, layouts_of, load_training_state, save_training_state


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    out: Path | None = None
    model: object = None
    evals: list[dict] = field(default_factory=list)  # {"step", "loss", "perplexity"} on the validation split
    saves: list[Path] = field(default_factory=list)  # the intermediate saves this run wrote
    lora_base: str | None = None  # with --lora: the base model the saved adapter applies to


def batch_for_step(tokens: torch.Tensor, step: int, args: TrainArgs, rows: int | None = None) -> torch.Tensor:
    """The ``rows`` (default ``batch_size``) sequences of a step depend only on (seed, step): an
    interrupted and resumed run sees the same data in the same order. The first ``batch_size``
    of a larger draw are the smaller draw's, so N micro-batches are one batch of N*B."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - args.seq_len, (rows or args.batch_size,), generator=gen)
    return torch.stack([tokens[s:s + args.seq_len] for s in starts.tolist()])


class StepData:
    """The whole batch of each step (``grad_accumulation * batch_size`` rows): from the corpus
    (every token a label, no padding) or from ``--data`` (:mod:`crosschip.training.data`); either way a
    function of (seed, step). ``evaluation``: the validation split's dataset, or None."""

    def __init__(self, args: TrainArgs, tokenizer):
        self.args, self.rows = args, args.batch_size * args.grad_accumulation
        self.pad = pad_id(tokenizer)
        self.evaluation = None
        if args.data:
            self.dataset, self.evaluation = training_splits(args, tokenizer)
            # --packing: a step samples packed rows (groups of examples) instead of examples.
            self.groups = (pack_groups([len(ids) for ids in self.dataset["input_ids"]], args.seq_len)
                           if args.packing else None)
        else:
            self.tokens = _corpus_tokens(args, tokenizer)

    def __call__(self, step: int) -> Batch:
        if not self.args.data:
            ids = batch_for_step(self.tokens, step, self.args, self.rows)
            return Batch(ids, ids, None)
        if self.groups is not None:
            picked = step_indices(step, self.rows, len(self.groups), self.args.seed)
            return collate_packed(self.dataset, [self.groups[i] for i in picked], self.args.seq_len, self.pad)
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
        from crosschip.training.corpus import generate_corpus

        text = generate_corpus(seed=args.seed)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < args.seq_len + 2:
        raise ConfigurationError(f"the corpus has {len(ids)} tokens, fewer than --seq-len {args.seq_len} + 2")
    return ids


def _build(args: TrainArgs, state: dict | None, resumed: Path | None):
    """Model and tokenizer for a fresh run, or for resuming the run whose ``meta.json`` is
    ``state``, read from ``resumed`` (the committed directory of ``--resume``, resolved once, so
    that weights, tokenizer and training state come from one save)."""
    lora = args.lora_config()
    # With --lora a save holds the adapter only: a resume rebuilds the frozen base from --model.
    source = str(resumed) if resumed is not None and lora is None else args.model
    if (resumed is None or lora is not None) and (cached := hub.resolve(args.model, args.revision,
                                                                         option="--model")):
        source = str(cached)  # a local directory, or the cached snapshot of a Hub model id
    if lora is not None and not Path(source).is_dir():
        raise ConfigurationError(f"--lora: --model {args.model} is a preset; an adapter is saved without the base "
                                 "weights, so it trains on a Hugging Face checkpoint (a directory or a Hub model id)")
    if Path(source).is_dir():
        model = from_pretrained(source, backend=args.backend, device=args.device, dtype=args.dtype,
                                precision=args.precision, fp8_recipe=args.fp8_recipe,
                                activation_checkpointing=args.activation_checkpointing, tp=args.tp,
                                dp=args.dp, sequence_parallel=args.sequence_parallel, ep=args.ep)
        tokenizer = load_tokenizer(source)
    else:
        config = preset_config(args.model)
        runtime = Runtime(args.backend, device=args.device, dtype=args.dtype, precision=args.precision,
                          fp8_recipe=args.fp8_recipe, activation_checkpointing=args.activation_checkpointing,
                          parallel=ParallelSpec(tp=args.tp, dp=args.dp, ep=args.ep,
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
    if lora is not None:
        torch.manual_seed(args.seed)  # the adapter's initialisation follows the run's seed
        model.add_adapter(lora)
    compile_model(model, args.compile_option())  # after the adapter, whose hooks are part of the forward
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
    if args.lora is not None and out.is_dir() and Path(args.model).is_dir() and \
            os.path.realpath(out) == os.path.realpath(args.model):
        raise ConfigurationError(f"--out {out}: is the base model (--model) the adapter trains on; choose another --out")
    if args.overwrite or not out.is_dir() or not holds_checkpoint(out):
        return
    started_from = {os.path.realpath(p) for p in (args.resume, args.model) if p and Path(p).is_dir()}
    # A resume from one of the run's own intermediate saves may replace the run's final save.
    same_run = bool(args.resume) and periodic_saves.run_id_of(Path(args.resume)) is not None and \
        periodic_saves.run_id_of(out) == periodic_saves.run_id_of(Path(args.resume))
    if os.path.realpath(out) not in started_from and not same_run:
        raise ConfigurationError(f"--out {out}: already holds a checkpoint that this run did not start from; "
                                 "pass --overwrite to replace it, or choose another --out")


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
    if args.optimizer_in_backward:  # its step() after the backward then has nothing left to do
        squares = GradientSquares()  # the gradient norm, summed as each gradient is stepped and freed
        in_backward.step_in_backward(optimizer, observe=lambda param: squares.add([param]))
        gradient_norm = squares.norm
    else:  # inf: measured, not clipped
        gradient_norm = lambda: clip_gradients(params, args.max_grad_norm or float("inf"))  # noqa: E731
    start, losses = 0, []
    # One id for the whole run, kept across resumes: --keep-last removes only this run's saves.
    run_id = (state or {}).get("run_id") or uuid.uuid4().hex
    if state is not None:
        load_training_state(model, optimizer, resumed / STATE_DIR, state, run_at=(args.tp, args.dp),
                             resume=args.resume)
        start, losses = state["step"], list(state["losses"])
    if start >= args.steps:
        raise ConfigurationError(f"--resume {args.resume} is already at step {start}; ask for --steps > {start}")
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    if args.save_every and _rank() == 0:
        periodic_saves.check_targets(args.out, _save_steps(args, start, end), run_id, args.overwrite)
    with _locked_output(args):
        return _steps_and_save(args, model, tokenizer, optimizer, gradient_norm, data, start, end, losses, run_id,
                               progress)


def _save_steps(args: TrainArgs, start: int, end: int) -> list[int]:
    """The steps after which this run writes ``checkpoint-<step>`` (the last one goes to ``out``)."""
    return [s for s in range(start + 1, end) if s % args.save_every == 0] if args.save_every else []


def _steps_and_save(args, model, tokenizer, optimizer, gradient_norm, data: StepData, start: int, end: int,
                    losses: list, run_id: str, progress: bool):
    """The run's steps, its periodic saves and the final one. ``gradient_norm()``: the step's
    gradient norm (clipping by it when the run clips), after its backward."""
    from tqdm.auto import tqdm

    device = model.runtime.device
    result = TrainResult(losses=losses, out=Path(args.out), model=model,
                         lora_base=normalised("model", args.model) if args.lora is not None else None)
    saves_at = set(_save_steps(args, start, end))

    bar = tqdm(range(start, end), initial=start, total=args.steps, disable=not progress or _rank() != 0,
               desc="train", unit="step", dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss, gradient norm) not yet read back
    metrics = StepMetrics(args.out, sinks=parse_log(args.log), resume=args.resume, start=start,
                          config=recorded(args), enabled=_rank() == 0)
    for step in bar:
        if args.lora is not None:  # the adapter's dropout masks: a function of (seed, step), as the data
            torch.manual_seed(args.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss, tokens = _accumulated_step(model, data(step), args, device)
        grad_norm = gradient_norm()
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
            barrier()
    bar.close()
    metrics.close()

    # Weights, tokenizer and training state: one save, committed only when every rank wrote its part.
    if args.save:
        _save(args.out, model, tokenizer, optimizer, end, losses, args, run_id)
    result.tokens_per_second = seen / max(time.perf_counter() - t0, 1e-9)
    return result


def _save(directory, model, tokenizer, optimizer, step: int, losses: list, args: TrainArgs, run_id: str) -> None:
    with atomic_save(directory, distributed=model._parallel()) as staging:
        if args.lora is not None:  # the adapter in PEFT's format; the frozen base stays in --model
            from crosschip.lora import attach

            attach.write(model, staging, base_model=normalised("model", args.model))
            if _rank() == 0:
                tokenizer.save_pretrained(staging)
        else:
            model.write_pretrained(staging, extra_files=tokenizer.save_pretrained)
        save_training_state(model, optimizer, staging / STATE_DIR, {
            "step": step, "losses": list(losses), "args": recorded(args), "backends": _backends(model),
            "layouts": layouts_of(model), "tp": args.tp, "dp": args.dp, "run_id": run_id,
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
        mask, documents, positions = (None if t is None else _to_device(t, device)
                                      for t in (part.attention_mask, part.document_ids, part.position_ids))
        # The loss component shifts the labels, as transformers does.
        loss = model(ids, attention_mask=mask, labels=labels, return_logits=False, document_ids=documents,
                     position_ids=positions).loss
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
        join_launched_group(args.device)


