"""The built-in training corpus: generated, deterministic, structured English-like text, so
``crosschip train`` needs no download and its loss visibly falls."""

from __future__ import annotations

import random

_SUBJECTS = ["the engineer", "a small model", "the compiler", "every chip", "the tensor", "our team",
             "the kernel", "a backend", "the optimizer", "the runtime", "the checkpoint", "a plugin"]
_VERBS = ["trains", "loads", "shards", "compiles", "saves", "measures", "runs", "checks", "fuses", "streams"]
_OBJECTS = ["the weights", "a layer", "every gradient", "the attention heads", "the logits", "a batch",
            "the cache", "the loss", "a new device", "the parameters"]
_ENDINGS = ["on the GPU", "on a CPU", "with care", "in bfloat16", "before the deadline", "twice",
            "without a copy", "in parallel", "at every step", "from disk"]


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_ENDINGS)}.").capitalize()


def generate_corpus(num_chars: int = 400_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < num_chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(3, 7))) + "\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)
