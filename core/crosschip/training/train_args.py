"""The arguments of a training run (``crosschip train``'s options), checked before anything is
built; which of them define a run on resume is :mod:`crosschip.training.resume`'s business."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crosschip.errors import ConfigurationError
from crosschip.modeling.compilation import CUDA_GRAPH
from crosschip.training.metrics import parse_log
from crosschip.training.schedule import SCHEDULES

#: ``crosschip train --compile MODE``: torch.compile's modes ("reduce-overhead" replays CUDA graphs), and
#: "cuda-graph": the layers recorded as CUDA graphs without torch.compile (crosschip.modeling.layer_graphs).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", CUDA_GRAPH)


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
    packing: bool = False  # --data: several documents per row, attention kept within each
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
    save: bool = True  # False (--no-save): the run's result is its metrics.jsonl; no checkpoint is written
    tp: int = 1  # tensor parallel degree (launch with torchrun --nproc_per_node tp * dp)
    dp: int = 1  # data parallel degree (FSDP2); each dp rank trains on batch_size / dp sequences
    sequence_parallel: bool = False  # with tp > 1: norms and residuals sharded along the sequence
    ep: int = 1  # expert parallel degree (divides dp): each dp rank holds num_experts / ep of every MoE layer
    # torch.compile the model's forward (and so its backward): faster steps. True, or a torch.compile
    # mode ("reduce-overhead": also CUDA graphs), or "cuda-graph" (layers as CUDA graphs, no
    # torch.compile), see compile_option().
    compile: bool | str = False
    # Each parameter stepped as soon as its gradient is ready, its gradient freed (less memory);
    # needs --max-grad-norm 0 and --grad-accumulation 1 (crosschip.training.in_backward).
    optimizer_in_backward: bool = False
    # Losses are read back from the device (a host sync on accelerators) every this many steps:
    # for the progress bar and the divergence check.
    log_every: int = 10
    # With resume: run-defining arguments that may differ from the saved run, "name=value"
    # (several per item, comma-separated); see crosschip.training.resume.
    override: list[str] | None = None
    overwrite: bool = False  # replace a checkpoint in `out` that this run did not start from
    revision: str | None = None  # with a Hub model id as `model`: a branch, tag or commit
    log: str | None = None  # "tensorboard,wandb": also send step metrics there (metrics.jsonl always)
    # "r=16,alpha=32[,dora][,dropout=P][,targets=q_proj+v_proj]": train a LoRA/DoRA adapter on the
    # frozen base `model` and save the adapter (PEFT's format) instead of the base weights.
    lora: str | None = None

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
        if not self.save and (self.save_every is not None or self.stop_after is not None):
            raise ConfigurationError(f"--no-save writes no checkpoint, so it takes no --save-every or --stop-after "
                                     f"(found --save-every {self.save_every}, --stop-after {self.stop_after})")
        if self.keep_last is not None and self.save_every is None:
            raise ConfigurationError("--keep-last applies only with --save-every")
        if not self.lr > 0:
            raise ConfigurationError(f"--lr must be positive, found {self.lr}")
        if self.tp <= 0 or self.dp <= 0 or self.ep <= 0:
            raise ConfigurationError(f"--tp, --dp and --ep must be positive, found --tp {self.tp} --dp {self.dp} "
                                     f"--ep {self.ep}")
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
        self.lora_config()
        self.compile_option()
        self._check_optimizer_in_backward()

    def _check_optimizer_in_backward(self) -> None:
        if not self.optimizer_in_backward:
            return
        conflicts = [f"{option} (found {found})" for option, found, ok in (
            ("--max-grad-norm 0: the gradient norm is known only after every parameter stepped", self.max_grad_norm,
             self.max_grad_norm == 0),
            ("--grad-accumulation 1: every backward steps", self.grad_accumulation, self.grad_accumulation == 1))
            if not ok]
        if conflicts:
            raise ConfigurationError("--optimizer-in-backward needs " + "; ".join(conflicts))

    def compile_option(self):
        """What ``from_pretrained(compile=...)`` takes for ``--compile [MODE]``."""
        if self.compile in (True, False, None):
            return bool(self.compile)
        if self.compile not in COMPILE_MODES:
            raise ConfigurationError(f"--compile {self.compile!r}: expected no value or one of "
                                     f"{', '.join(COMPILE_MODES)}")
        return self.compile if self.compile == CUDA_GRAPH else {"mode": self.compile}

    def lora_config(self):
        """``--lora`` as a :class:`crosschip.LoraConfig` (None without it); bad text is a
        ConfigurationError naming ``--lora``."""
        if self.lora is None:
            return None
        from crosschip.lora.config import LoraConfig

        return LoraConfig.parse(self.lora, where="--lora")

    def _check_data(self) -> None:
        choices = {"train_on": ("assistant", "all"), "long_documents": ("truncate", "split")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigurationError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected one of "
                                         f"{', '.join(valid)}")
        if self.packing and not self.data:
            raise ConfigurationError("--packing applies only with --data")
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
