"""--optimizer-in-backward: each parameter stepped when its gradient is ready is the same run as
one optimizer step after the backward (bitwise, with the same gradient norm), holds no gradients
after the backward, saves a training state that resumes in either mode, works under tensor and
data parallelism, and refuses what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch

from crosschip.errors import ConfigurationError
from crosschip.training.in_backward import BUCKET_NUMEL, step_in_backward
from crosschip.training.train import TrainArgs, train
from helpers import save_hf_llama


def _args(tmp_path, name, **kw):
    # On the CPU also on a GPU machine: bitwise equality needs deterministic kernels.
    base = dict(device="cpu", steps=4, batch_size=4, seq_len=32, lr=3e-3, max_grad_norm=0.0, weight_decay=0.1, seed=3,
                lr_schedule="linear", warmup=2, out=str(tmp_path / name))
    return TrainArgs(**{**base, **kw})


def _metrics(directory) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(ours: list[dict], theirs: list[dict]) -> None:
    """Every logged step (log_every=1, six steps): the same loss and gradient norm, to float32
    rounding of differently ordered sums (measured: up to 3e-7 in the loss, 3e-6 in the norm)."""
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 7))
    for got, expected in zip(ours, theirs):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-5)


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_same_run_as_the_step_after_backward(tmp_path):
    after = train(_args(tmp_path, "after"), progress=False)
    during = train(_args(tmp_path, "during", optimizer_in_backward=True), progress=False)
    assert during.losses == after.losses  # the schedule's lr reaches every per-parameter optimizer
    ours, theirs = _weights(tmp_path / "during"), _weights(tmp_path / "after")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # The gradient norm, summed as each gradient is stepped and freed, is the one clipping measures.
    norms = [[row["grad_norm"] for row in _metrics(tmp_path / run)] for run in ("during", "after")]
    assert len(norms[0]) == 1 and norms[0][0] > 0
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_training_state_resumes_in_either_mode(tmp_path, first, then):
    full = train(_args(tmp_path, "full", steps=6), progress=False)
    train(_args(tmp_path, "half", steps=6, stop_after=3, optimizer_in_backward=first), progress=False)
    resumed = train(_args(tmp_path, "resumed", steps=6, resume=str(tmp_path / "half"), optimizer_in_backward=then),
                    progress=False)
    assert resumed.losses == full.losses


def _groups(model):
    """Two parameter groups with their own settings (norms without weight decay, at another lr)."""
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0, "lr_scale": 0.5}]


@pytest.mark.parametrize("bucket_numel", [0, 5000, BUCKET_NUMEL], ids=["alone", "buckets", "at-the-end"])
def test_no_gradient_outlives_the_backward_and_tied_weights_step_once(tmp_path, bucket_numel):
    """Each parameter stepped alone, in buckets of a few (the tiny model's 40k elements), or all
    at the backward's end: the same weights, bitwise, as the step after the backward, over two
    parameter groups; a bucket holds at most ``bucket_numel`` elements plus one gradient."""
    import crosschip

    save_hf_llama(tmp_path / "m", vocab_size=64, tie_word_embeddings=True)
    model = crosschip.from_pretrained(tmp_path / "m", backend="torch", device="cpu").train()
    reference = crosschip.from_pretrained(tmp_path / "m", backend="torch", device="cpu").train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(_groups(model), lr=1e-2, weight_decay=0.1)
    waiting = []  # the elements of the gradients held when each hook came

    def observe(param):
        waiting.append(handle.buckets.size + sum(p.numel() for p in model.parameters() if p.grad is not None))

    handle = step_in_backward(optimizer, observe, bucket_numel=bucket_numel)
    with pytest.raises(ConfigurationError, match="already steps in the backward pass"):
        step_in_backward(optimizer)  # twice would step every parameter twice
    plain = torch.optim.AdamW(_groups(reference), lr=1e-2, weight_decay=0.1)
    for lr in (1e-2, 3e-3):  # a schedule's lr reaches the steps in backward
        for o in (optimizer, plain):
            for group in o.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        model(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        optimizer.step()  # nothing left to do
        reference(ids, labels=ids).loss.backward()
        plain.step()
        plain.zero_grad()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(ours, theirs), name
    assert optimizer.state_dict()["state"].keys() == plain.state_dict()["state"].keys()
    largest = max(p.numel() for p in model.parameters())
    assert max(waiting) < bucket_numel + 2 * largest  # the bucket, and the gradient observed
    if bucket_numel < sum(p.numel() for p in model.parameters()):
        assert max(waiting) < sum(p.numel() for p in model.parameters()) - largest  # stepped before the end
    handle.remove()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    step_in_backward(optimizer).remove()  # after remove(), it may be turned on again


def test_a_backward_that_raised_steps_nothing_it_left_waiting(tmp_path):
    """A backward that fails half-way leaves no gradient on any parameter (the next backward would
    add to it) and the bucket it filled is dropped at the next one: the weights are those of the
    one backward that ended."""
    import crosschip

    save_hf_llama(tmp_path / "m", vocab_size=64)
    model, reference = (crosschip.from_pretrained(tmp_path / "m", backend="torch", device="cpu").train()
                        for _ in range(2))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    stepping = step_in_backward(torch.optim.AdamW(model.parameters(), lr=1e-2))
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)

    def fail(grad):
        raise RuntimeError("half-way")

    handle = model.model.embed_tokens.weight.register_hook(fail)  # its gradient comes last
    with pytest.raises(RuntimeError, match="half-way"):
        model(ids, labels=ids).loss.backward()
    handle.remove()
    assert all(p.grad is None for p in model.parameters())
    assert not stepping.buckets.open  # dropped when that backward's end was freed uncalled
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    plain.step()
    assert all(p.grad is None for p in model.parameters())
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("bucket_numel", [0, 4, BUCKET_NUMEL], ids=["alone", "buckets", "at-the-end"])
def test_a_reentrant_backward_inside_the_backward_keeps_the_outer_bucket(bucket_numel):
    """Reentrant checkpointing runs a backward inside the backward, with its own end: the
    gradients the outer one holds wait for theirs, the inner one's step at its end, and the
    weights are those of the step after the backward."""
    from torch.utils.checkpoint import checkpoint

    def weights():
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(3)]

    def loss(first, inner, last):
        hidden = checkpoint(lambda h: (h * inner).tanh(), first.sin(), use_reentrant=True)
        return (hidden * last).sum()  # ``last``'s gradient is ready before the inner backward runs

    ours, theirs = weights(), weights()
    optimizer, plain = torch.optim.AdamW(ours, lr=0.1), torch.optim.AdamW(theirs, lr=0.1)
    step_in_backward(optimizer, bucket_numel=bucket_numel)
    for _ in range(2):
        loss(*ours).backward()
        loss(*theirs).backward()
        plain.step()
        plain.zero_grad()
    assert all(p.grad is None for p in ours)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option, message", [
    (dict(), "--max-grad-norm 0: the gradient norm is known only after every parameter stepped (found 1.0)"),
    (dict(max_grad_norm=0.0, grad_accumulation=2), "--grad-accumulation 1: every backward steps (found 2)"),
])
def test_what_it_cannot_do_is_refused_naming_the_option(tmp_path, option, message):
    with pytest.raises(ConfigurationError, match="--optimizer-in-backward needs") as caught:
        TrainArgs(optimizer_in_backward=True, out=str(tmp_path / "o"), **option).check()
    assert message in str(caught.value)


def _parallel_run(rank: int, world: int, root, tp: int, dp: int) -> None:
    train(_args(root, f"tp{tp}-dp{dp}", steps=6, log_every=1, tp=tp, dp=dp, sequence_parallel=tp > 1,
                optimizer_in_backward=True), progress=False)


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_run_equals_one_process(tmp_path, tp, dp):
    """tp=2 with sequence parallelism (DTensor parameters, gradients summed over both ranks
    before the step), dp=2 (FSDP2 runs the sharded parameters' hooks after its reduce-scatter)
    and both: the losses and gradient norms of the single-process run, which steps after the
    backward."""
    from gloo_spawn import spawn

    single = train(_args(tmp_path, "single", steps=6, log_every=1), progress=False)
    spawn(tp * dp, tmp_path, _parallel_run, tp, dp)
    _assert_same_metrics(_metrics(tmp_path / f"tp{tp}-dp{dp}"), _metrics(tmp_path / "single"))
    assert single.losses[-1] < single.losses[0]


def _neuron_run(rank: int, world: int, root) -> None:
    import os

    os.environ.update(NXD_CPU_MODE="1", NEURON_PLATFORM_TARGET_OVERRIDE="trn1")
    train(_args(root, "neuron", steps=6, log_every=1, backend="neuron", tp=world, optimizer_in_backward=True),
          progress=False)


@pytest.mark.neuron_cpu
def test_neuron_tp2_run_equals_one_reference_process(tmp_path):
    """The neuron backend (neuronx-distributed's CPU mode, tp=2, its own checkpoint format, which
    saves the same one optimizer): the reference run's losses and gradient norms."""
    from gloo_spawn import spawn

    train(_args(tmp_path, "single", steps=6, log_every=1, backend="reference"), progress=False)
    spawn(2, tmp_path, _neuron_run)
    _assert_same_metrics(_metrics(tmp_path / "neuron"), _metrics(tmp_path / "single"))
