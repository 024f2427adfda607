"""Data parallelism (FSDP2 over the "dp" dim of a (dp, tp) mesh) composed with tensor and
sequence parallelism on the torch backend (gloo, CPU), against the single-process model: each
data-parallel rank runs its own part of the batch, and the mean of their losses and the averaged
gradients equal the single model's on the whole batch; logits, a few AdamW steps, the streaming
load (each rank reads only what it holds) and the saved checkpoint (bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crosschip
from crosschip.errors import ConfigurationError
from gloo_spawn import spawn
from helpers import assert_parallel_grads_match, assert_rel_close, assert_saves_alike, save_hf_llama

TOL = 1e-5


def _mean_over(value: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


def _check_parity(root: Path, name: str, tp: int, dp: int, sp: bool, compile: bool = False, *, rank: int) -> None:
    from torch.distributed.tensor import DTensor

    path = root / name
    where = f"{name} tp={tp} dp={dp} sp={sp}" + (" compiled" if compile else "")
    single = crosschip.from_pretrained(path, backend="torch").train()
    model = crosschip.from_pretrained(path, backend="torch", tp=tp, dp=dp, sequence_parallel=sp,
                                      compile=compile).train()
    mesh = model.runtime.device_mesh
    assert mesh.mesh_dim_names == tuple(n for n, d in (("dp", dp), ("tp", tp)) if d > 1)
    norm = model.model.norm.weight
    assert isinstance(norm, DTensor) and norm.to_local().numel() * dp == norm.numel(), where
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in model.parameters())
    assert model.checkpoint_bytes_read == held, (where, model.checkpoint_bytes_read, held)

    assert_saves_alike(model, single, root / f"{name}-tp{tp}-dp{dp}-sp{int(sp)}-c{int(compile)}", rank, where)

    dp_group = mesh.get_group("dp")
    dp_rank = mesh.get_local_rank("dp")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2 * dp, 16))
    part = ids.chunk(dp)[dp_rank]
    if not sp and not compile:  # greedy decoding with a KV cache through the sharded blocks (no SP: one position per step)
        prompt = ids[:2, :5]
        assert torch.equal(model.generate(prompt, max_new_tokens=4), single.generate(prompt, max_new_tokens=4))
        # No gathered copy outlives a forward without gradients: the optimizer built below must
        # hold the shards.
        assert all(isinstance(p, DTensor) for p in model.parameters()), where
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-3) for m in (single, model)]
    for step in range(3):
        expected = single(ids, labels=ids)
        expected.loss.backward()
        got = model(part, labels=part)
        got.loss.backward()
        at = f"{where} step {step}"
        # Not a view: an in-place op on a returned view would drop FSDP2's pre-backward hook.
        assert got.logits._base is None, at
        assert_rel_close(got.logits, expected.logits.chunk(dp)[dp_rank], TOL, f"{at} logits")
        assert_rel_close(_mean_over(got.loss, dp_group), expected.loss, TOL, f"{at} loss")
        assert_parallel_grads_match(model, single, TOL, at)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def _check_mixed_precision(root: Path) -> None:
    """``param_dtype``: parameters are stored in float32 and gathered in bfloat16 for compute."""
    model = crosschip.from_pretrained(root / "llama", backend="torch", tp=2, dp=2,
                                      param_dtype=torch.bfloat16, reduce_dtype=torch.float32).train()
    seen = []
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda module, args: seen.append(module.down_proj.weight.dtype))
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def _check_errors(root: Path, world: int) -> None:
    with pytest.raises(ConfigurationError, match=f"tp=2 x dp=3 = 6 ranks does not match the world size {world}"):
        crosschip.from_pretrained(root / "llama", backend="torch", tp=2, dp=3)
    with pytest.raises(ConfigurationError, match="on device meta: the torch backend builds its DeviceMesh on cpu or cuda"):
        crosschip.from_pretrained(root / "llama", backend="torch", tp=2, dp=2, device="meta")
    if not torch.cuda.is_available():
        # Refused by the Runtime, for any model, before the parallel plan is reached.
        with pytest.raises(ConfigurationError, match="device 'cuda': CUDA is not available on this machine"):
            crosschip.from_pretrained(root / "llama", backend="torch", tp=2, dp=2, device="cuda")


def _run(rank: int, world: int, root: Path, cases) -> None:
    for case in cases:
        if case == "errors":
            _check_errors(root, world)
        elif case == "mixed-precision":
            _check_mixed_precision(root)
        else:
            _check_parity(root, *case, rank=rank)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import Qwen2Config
    from zoo import BASE, save_hf

    root = tmp_path_factory.mktemp("dp")
    save_hf_llama(root / "llama")
    save_hf(root / "qwen2", Qwen2Config(**BASE))
    # One KV head at tp=2: each TP rank holds a replica, summed per data-parallel replica.
    save_hf_llama(root / "mqa", num_key_value_heads=1)
    return root


def test_tp2_dp2_matches_single_process(checkpoints):
    spawn(4, checkpoints, _run, [("llama", 2, 2, False), ("qwen2", 2, 2, False), ("llama", 2, 2, True),
                                 ("qwen2", 2, 2, True), ("mqa", 2, 2, False), "mixed-precision", "errors"])


def test_dp2_alone_matches_single_process(checkpoints):
    spawn(2, checkpoints, _run, [("qwen2", 1, 2, False)])
