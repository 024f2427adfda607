"""The main job: train a causal LM on the built-in corpus (or a text file), on any backend, and
save a Hugging Face checkpoint with everything needed to resume."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crosschip.errors import ConfigurationError
from crosschip.init import init_weights
from crosschip.loading import build_model, finalize, from_pretrained
from crosschip.models import model_class
from crosschip.presets import preset_config
from crosschip.runtime import Runtime
from crosschip.tokenizer import ByteTokenizer, load_tokenizer

STATE_FILE = "training_state.pt"


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
    warmup: int | None = None
    stop_after: int | None = None  # stop and save after this many steps of this run (resume later)

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"--{name.replace('_', '-')} must be positive, found {getattr(self, name)}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ConfigurationError(f"--stop-after must be positive, found {self.stop_after}")
        if not self.lr > 0:
            raise ConfigurationError(f"--lr must be positive, found {self.lr}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    out: Path | None = None
    model: object = None


def learning_rate(step: int, args: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = args.warmup if args.warmup is not None else max(1, min(100, args.steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_for_step(tokens: torch.Tensor, step: int, args: TrainArgs) -> torch.Tensor:
    """The batch of a step depends only on (seed, step): an interrupted and resumed run sees
    the same data in the same order."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - args.seq_len, (args.batch_size,), generator=gen)
    return torch.stack([tokens[s:s + args.seq_len] for s in starts.tolist()])


def _corpus_tokens(args: TrainArgs, tokenizer) -> torch.Tensor:
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ConfigurationError(f"--text {path}: no such file")
        text = path.read_text(encoding="utf-8")
    else:
        from crosschip.corpus import generate_corpus

        text = generate_corpus(seed=args.seed)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < args.seq_len + 2:
        raise ConfigurationError(f"the corpus has {len(ids)} tokens, fewer than --seq-len {args.seq_len} + 2")
    return ids


def _build(args: TrainArgs):
    """Model, tokenizer and starting step (and optimizer state) for a fresh or resumed run."""
    source = args.resume or args.model
    if Path(source).is_dir():
        model = from_pretrained(source, backend=args.backend, device=args.device, dtype=args.dtype,
                                precision=args.precision, fp8_recipe=args.fp8_recipe,
                                activation_checkpointing=args.activation_checkpointing)
        tokenizer = load_tokenizer(source)
    elif args.resume:
        raise ConfigurationError(f"--resume {args.resume}: not a directory")
    else:
        config = preset_config(args.model)
        runtime = Runtime(args.backend, device=args.device, dtype=args.dtype, precision=args.precision,
                          fp8_recipe=args.fp8_recipe, activation_checkpointing=args.activation_checkpointing)
        model = build_model(model_class(config.architectures[0]), config, runtime)
        init_weights(model, seed=args.seed, std=config.initializer_range)
        finalize(model)
        tokenizer = ByteTokenizer()
    state = None
    if args.resume:
        state_file = Path(args.resume) / STATE_FILE
        if not state_file.is_file():
            raise ConfigurationError(f"--resume {args.resume}: {STATE_FILE} missing (not a training checkpoint)")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        backends = _backends(model)
        if state["backends"] != backends:
            raise ConfigurationError(
                f"--resume {args.resume}: optimizer state was saved with backends {state['backends']}, "
                f"this run builds {backends}; resume on the same backend")
    if tokenizer.vocab_size > model.opts.vocab_size:
        raise ConfigurationError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                                 f"{model.opts.vocab_size}")
    return model.train(), tokenizer, state


def _backends(model) -> dict[str, list[str]]:
    return {k: sorted(v["backend"] for v in entries) for k, entries in model.runtime.report.summary().items()}


def train(args: TrainArgs, progress: bool = True) -> TrainResult:
    args.check()
    torch.manual_seed(args.seed)
    model, tokenizer, state = _build(args)
    device = model.runtime.device
    tokens = _corpus_tokens(args, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01,
                                  fused=device.type == "cuda")
    start, losses = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], list(state["losses"])
    if start >= args.steps:
        raise ConfigurationError(f"--resume {args.resume} is already at step {start}; ask for --steps > {start}")

    from tqdm.auto import tqdm

    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    bar = tqdm(range(start, end), initial=start, total=args.steps, disable=not progress,
               desc="train", unit="step", dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()
    for step in bar:
        batch = batch_for_step(tokens, step, args).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        # Labels are the inputs: the loss component shifts them, as transformers does.
        loss = model(batch, labels=batch, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen += batch.numel()
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
    bar.close()

    def extras(directory: Path) -> None:
        tokenizer.save_pretrained(directory)
        torch.save({"step": end, "losses": losses, "optimizer": optimizer.state_dict(),
                    "args": asdict(args), "backends": _backends(model)}, directory / STATE_FILE)

    out = model.save_pretrained(args.out, extra_files=extras)
    return TrainResult(losses, seen / max(time.perf_counter() - t0, 1e-9), out, model)
