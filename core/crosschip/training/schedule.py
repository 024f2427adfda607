"""The learning rate of each step: linear warm-up, then a decay to a tenth of the peak.

``cosine`` (the default, and what every run before ``--lr-schedule`` used) follows half a cosine;
``linear`` a straight line; ``constant`` stays at the peak. The warm-up is ``--warmup`` steps,
or ``min(100, steps / 10)`` (at least one) when not given; the decay spans the remaining steps,
so ``--steps`` extended on resume stretches it.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")
FLOOR = 0.1  # the decay ends at this fraction of the peak


def warmup_steps(args) -> int:
    return args.warmup if args.warmup is not None else max(1, min(100, args.steps // 10))


def learning_rate(step: int, args) -> float:
    """The rate of ``step`` (counted from 0) for ``TrainArgs`` ``args``."""
    warmup = warmup_steps(args)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
    schedule = getattr(args, "lr_schedule", "cosine")
    if schedule == "constant":
        return args.lr
    if schedule == "linear":
        return args.lr * (FLOOR + (1 - FLOOR) * (1 - progress))
    return args.lr * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
