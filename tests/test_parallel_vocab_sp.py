"""Vocab parallelism (embedding and LM head sharded on the vocabulary, the loss computed on the
vocab-sharded logits under ``loss_parallel``) and sequence parallelism of the torch backend (gloo,
CPU) equal the single-process model: logits, loss, every gradient (Hugging Face names) and a few
AdamW steps, for Llama (tied and untied) and Qwen2, with and without sequence parallelism (and
Qwen3, whose per-head q/k norms stay head-sharded under sequence parallelism); and the
loss never all-gathers the logits. One spawn per world size runs every case, since starting
processes dominates the cost on a small machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import crosschip
from crosschip.errors import ConfigurationError
from gloo_spawn import spawn
from helpers import assert_parallel_grads_match, assert_rel_close, save_hf_llama

TOL = 1e-5
# A vocabulary size no other dimension shares (hidden 64, seq 16, heads 8 x 8), so a gathered
# tensor of logits is recognisable by its shape.
VOCAB = 160


def _save_models(root: Path) -> None:
    from transformers import Qwen2Config, Qwen3Config
    from zoo import BASE, save_hf

    save_hf_llama(root / "llama", vocab_size=VOCAB)
    save_hf_llama(root / "llama-tied", vocab_size=VOCAB, tie_word_embeddings=True)
    save_hf(root / "qwen2", Qwen2Config(**{**BASE, "vocab_size": VOCAB}))
    # Per-head q/k norms: sharded on heads, never on the sequence.
    save_hf(root / "qwen3", Qwen3Config(**{**BASE, "vocab_size": VOCAB}, head_dim=16))


class _Gathers(TorchDispatchMode):
    """Records the input shape of every all-gather dispatched (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_gather" in func.name():
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _check_no_logits_gather(model, ids, tp: int, sp: bool) -> None:
    from torch.distributed.tensor import DTensor, Shard

    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with _Gathers() as gathers:
            out = model(ids, labels=ids, return_logits=False)
            out.loss.backward()
        with _Gathers() as with_logits:
            model(ids, labels=ids)
    finally:
        handle.remove()
    model.zero_grad()
    # The loss saw this rank's vocab shard of the logits, as a DTensor sharded on the vocab dim.
    logits = seen[0]
    assert isinstance(logits, DTensor) and logits.placements == (Shard(2),), logits
    assert logits.to_local().shape == (*ids.shape, VOCAB // tp)
    assert out.logits is None
    # No all-gather of logits anywhere in forward and backward (sequence parallelism gathers the
    # hidden states, [batch, seq / tp, hidden], before each column-parallel projection).
    logit_gathers = [s for s in gathers.shapes if VOCAB // tp in s]
    assert not logit_gathers, gathers.shapes
    if not sp:
        assert gathers.shapes == []
    # The detector sees the one gather when the logits are asked for.
    assert [s for s in with_logits.shapes if VOCAB // tp in s], with_logits.shapes


def _check_parity(root: Path, name: str, tp: int, sp: bool) -> None:
    from torch.distributed.tensor import DTensor, Shard

    path = root / name
    where = f"{name} tp={tp} sp={sp}"
    single = crosschip.from_pretrained(path, backend="torch").train()
    model = crosschip.from_pretrained(path, backend="torch", tp=tp, sequence_parallel=sp).train()
    embed = model.model.embed_tokens.weight
    assert isinstance(embed, DTensor) and embed.placements == (Shard(0),)
    assert embed.to_local().shape == (VOCAB // tp, 64)
    if not model.lm_head.spec.tied:
        assert model.lm_head.weight.placements == (Shard(0),)

    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16))
    _check_no_logits_gather(model, ids, tp, sp)

    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-3) for m in (single, model)]
    for step in range(2):
        expected = single(ids, labels=ids)
        expected.loss.backward()
        got = model(ids, labels=ids)
        got.loss.backward()
        at = f"{where} step {step}"
        assert type(got.logits) is torch.Tensor and type(got.loss) is torch.Tensor
        assert_rel_close(got.logits, expected.logits, TOL, f"{at} logits")
        assert_rel_close(got.loss, expected.loss, TOL, f"{at} loss")
        assert_parallel_grads_match(model, single, TOL, at)
        # Every gradient sits as its parameter does (no pending partial sums, shards stay shards).
        for pname, param in model.named_parameters():
            if isinstance(param, DTensor):
                assert param.grad.placements == param.placements, (at, pname, param.grad.placements)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()

    # Loss without logits: the same value.
    with torch.no_grad():
        assert_rel_close(model(ids, labels=ids, return_logits=False).loss,
                         single(ids, labels=ids, return_logits=False).loss, TOL, f"{where} loss only")
    # Greedy generation with a KV cache (decode steps of one token: an uneven sequence shard).
    prompt = ids[:, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=3), single.generate(prompt, max_new_tokens=3))


def _check_mixed_backends(root: Path, tp: int) -> None:
    """Another backend's loss: the head gathers its logits and the loss runs on them whole.
    Another backend's embedding: vocab parallelism is off (replicated, as before), and sequence
    parallelism, which needs it, is a clear error."""
    single = crosschip.from_pretrained(root / "llama", backend="torch")
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = single(ids, labels=ids)
        for components in ({"loss": "reference"}, {"embedding": "reference", "lm_head": "reference"}):
            model = crosschip.from_pretrained(root / "llama", backend="torch", tp=tp, components=components)
            got = model(ids, labels=ids)
            assert_rel_close(got.logits, expected.logits, TOL, f"{components} logits")
            assert_rel_close(got.loss, expected.loss, TOL, f"{components} loss")
    with pytest.raises(ConfigurationError, match=r"sequence_parallel=True.*embedding at model.embed_tokens"):
        crosschip.from_pretrained(root / "llama", backend="torch", tp=tp, sequence_parallel=True,
                                  components={"embedding": "reference"})


def _run(rank: int, world: int, root: Path, cases) -> None:
    for name, sp in cases:
        if name == "mixed":
            _check_mixed_backends(root, world)
        else:
            _check_parity(root, name, world, sp)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_sp")
    _save_models(root)
    return root


def test_vocab_and_sequence_parallel_tp2_match_single_process(checkpoints):
    spawn(2, checkpoints, _run, [(name, sp) for name in ("llama", "llama-tied", "qwen2") for sp in (False, True)]
            + [("qwen3", True), ("mixed", False)])


def test_sequence_parallel_tp4_replicating_kv_heads_matches_single_process(checkpoints):
    spawn(4, checkpoints, _run, [("llama-tied", True)])


def test_sequence_parallel_needs_tensor_parallelism(checkpoints):
    with pytest.raises(ConfigurationError, match="sequence_parallel=True .* needs tp > 1"):
        crosschip.from_pretrained(checkpoints / "llama", backend="torch", sequence_parallel=True)


def test_single_process_vocab_components_are_the_torch_backends(checkpoints):
    model = crosschip.from_pretrained(checkpoints / "llama-tied", backend="torch")
    built = {d.component: d.backend for d in model.runtime.report.decisions}
    assert (built["embedding"], built["lm_head"], built["loss"]) == ("torch", "torch", "torch")
    assert model.lm_head.output_weight() is model.model.embed_tokens.weight
