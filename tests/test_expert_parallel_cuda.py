"""Expert parallelism with NCCL on two GPUs: the gloo test's comparison (tests/test_expert_parallel.py)
on CUDA. float32 (the experts' loop path) equals one process within 1e-5; bfloat16 runs the grouped
GEMMs on each rank's experts and its loss stays within bf16 rounding of one process's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crosschip
from gloo_spawn import spawn
from test_expert_parallel import _config, _rank
from zoo import save_hf

pytestmark = [pytest.mark.cuda, pytest.mark.multigpu]


def test_ep2_matches_one_process_over_nccl(tmp_path):
    save_hf(tmp_path / "moe", _config())
    save_hf(tmp_path / "moe5", _config(num_experts=5))
    spawn(2, tmp_path, _rank, 1, "cuda", backend="nccl")


def _bf16_rank(rank: int, world: int, root: Path) -> None:
    import torch.distributed as dist

    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    single = crosschip.from_pretrained(root / "moe", backend="torch", device="cuda", dtype="bf16").train()
    model = crosschip.from_pretrained(root / "moe", backend="torch", device="cuda", dtype="bf16", dp=2, ep=2).train()
    expected = single(ids, labels=ids).loss.float()
    part = ids.chunk(2)[rank]
    loss = model(part, labels=part).loss
    loss.backward()
    mean = loss.detach().float().clone()
    dist.all_reduce(mean)
    mean /= 2
    assert abs(mean - expected) <= 2e-2 * abs(expected), (mean.item(), expected.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ep2_bf16_grouped_gemms_over_nccl(tmp_path):
    save_hf(tmp_path / "moe", _config())
    spawn(2, tmp_path, _bf16_rank, backend="nccl")
