"""``attention``: scaled dot-product attention over heads."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.examples import BATCH, SEQ, randn
from crosschip.components.fields import check_softcap, positive, quiet
from crosschip.components.kind import LOCAL, ComponentKind, Example


@dataclass(frozen=True)
class AttentionSpec:
    """Scaled dot-product attention over ``[batch, seq, heads, head_dim]`` inputs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    sliding_window: int | None = None
    scale: float | None = None
    dropout: float = 0.0
    #: Gemma 2's attention logit soft-capping: scores become ``softcap * tanh(scores / softcap)``.
    softcap: float | None = quiet(None, extension=True)

    def __post_init__(self):
        check_softcap("AttentionSpec", self.softcap)
        positive("AttentionSpec.num_heads", self.num_heads)
        positive("AttentionSpec.num_kv_heads", self.num_kv_heads)
        positive("AttentionSpec.head_dim", self.head_dim)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim**-0.5


def _example(spec: AttentionSpec, options, gen) -> Example:
    import torch

    from crosschip.modeling.masks import AttentionMask

    kv_len = SEQ + 1
    q_len = options.get("q_len", kv_len)
    mask, keep = None, None
    if options.get("padding"):
        padding = torch.ones(BATCH, kv_len, dtype=torch.bool)
        padding[1, :2] = False  # left padding in the second sequence
        mask, keep = AttentionMask(padding=padding), padding
    elif options.get("static_cache"):
        # A static cache's buffer: the queries sit at a device-tensor offset, the last two slots
        # are not written yet (random here, so a backend that attends to them fails), row 1
        # is left-padded.
        padding = torch.ones(BATCH, kv_len, dtype=torch.bool)
        padding[1, :2] = False
        mask = AttentionMask(padding=padding, q_offset=torch.tensor(kv_len - q_len - 2))
    elif q_len != kv_len:
        mask = AttentionMask(q_offset=kv_len - q_len)
    return Example({"q": randn(gen, BATCH, q_len, spec.num_heads, spec.head_dim),
                    "k": randn(gen, BATCH, kv_len, spec.num_kv_heads, spec.head_dim),
                    "v": randn(gen, BATCH, kv_len, spec.num_kv_heads, spec.head_dim),
                    "mask": mask}, keep)


KIND = ComponentKind(
    name="attention",
    spec=AttentionSpec,
    weights=lambda spec: {},
    reference="crosschip.reference.components:EagerAttention",
    call=lambda module, inputs, helpers: (module(inputs["q"], inputs["k"], inputs["v"], inputs["mask"]),),
    example=_example,
    cases=lambda: [
        ("causal-gqa", AttentionSpec(4, 2, 8), {}),
        ("bidirectional", AttentionSpec(4, 4, 8, causal=False), {}),
        ("sliding-window", AttentionSpec(4, 2, 8, sliding_window=3), {}),
        ("left-padding", AttentionSpec(4, 1, 8, scale=0.2), {"padding": True}),
        ("cached-keys", AttentionSpec(4, 2, 8), {"q_len": 2}),
        ("static-cache", AttentionSpec(4, 2, 8, sliding_window=4), {"q_len": 2, "static_cache": True}),
        ("softcap", AttentionSpec(4, 2, 8, sliding_window=4, softcap=2.0), {}),
    ],
    tensor_parallel=lambda spec: LOCAL,
    summary="causal / bidirectional attention, GQA, sliding window, padding, soft-capping",
)
