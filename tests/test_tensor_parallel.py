"""Tensor parallelism of the torch backend (DTensor on a gloo "tp" mesh, CPU) equals the
single-process model: logits, loss, every gradient (mapped to Hugging Face names), a few AdamW
steps, and the saved checkpoint, bitwise. Each launch spawns one process per rank and runs several
checks, since starting processes dominates the cost on a small machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crosschip
from crosschip.errors import CheckpointError, ConfigurationError
from crosschip.weights.layouts import ReplicateHeads
from gloo_spawn import spawn
from helpers import assert_saves_alike, assert_training_steps_match, save_hf_llama

TOL = 1e-5


def _save_models(root: Path) -> None:
    """Llama (GQA 4), Qwen2 (QKV bias) and Qwen3 (q/k norms over each head), all with 8 query
    heads and 2 KV heads: tp=2 splits the KV heads, tp=4 replicates each twice. Two more whose
    sizes no TP degree of 2 divides, for the errors."""
    from transformers import Qwen2Config, Qwen3Config
    from zoo import BASE, save_hf

    save_hf_llama(root / "llama")
    save_hf(root / "qwen2", Qwen2Config(**BASE))
    save_hf(root / "qwen3", Qwen3Config(**BASE, head_dim=16))
    save_hf_llama(root / "heads7", hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
                  head_dim=8)
    save_hf_llama(root / "inter95", intermediate_size=95)


def _check_parity(root: Path, name: str, tp: int, rank: int) -> None:
    from torch.distributed.tensor import DTensor

    path = root / name
    single = crosschip.from_pretrained(path, backend="torch").train()
    model = crosschip.from_pretrained(path, backend="torch", tp=tp).train()
    assert model.runtime.parallel.tp == tp and model.runtime.device_mesh.size() == tp
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert isinstance(qkv, DTensor) and qkv.to_local().shape[0] * tp == qkv.shape[0]
    # Streaming sharded load: each rank read from the checkpoint exactly the bytes it holds.
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in model.parameters())
    assert model.checkpoint_bytes_read == held, (model.checkpoint_bytes_read, held)
    assert held < single.checkpoint_bytes_read

    # Saving gathers the shards (and takes one KV replica): the same bytes as the single model.
    assert_saves_alike(model, single, root / f"{name}-tp{tp}", rank, f"{name} tp={tp}")

    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 16))
    # The KV cache holds this rank's heads only; greedy tokens match.
    prompt = ids[:, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=4), single.generate(prompt, max_new_tokens=4))
    assert_training_steps_match(model, single, ids, TOL, f"{name} tp={tp}")


def _check_failed_save(root: Path, rank: int) -> None:
    """A save that fails on rank 0 raises on every rank (none waits forever) and leaves the
    previous checkpoint in place."""
    import crosschip.checkpoint.writer as writer

    model = crosschip.from_pretrained(root / "llama", backend="torch", tp=2)
    target = root / "failed-save"
    model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()
    real = writer.save_file
    if rank == 0:
        def failing(*args, **kwargs):
            raise OSError(28, "No space left on device")

        writer.save_file = failing
    try:
        with pytest.raises(CheckpointError, match="failed on rank 0: .*No space left on device"):
            model.save_pretrained(target)
    finally:
        writer.save_file = real
    assert (target / "model.safetensors").read_bytes() == before


def _check_fits_per_rank(root: Path, world: int) -> None:
    """The memory check counts the shards a rank will hold: a device with room for a 1/world
    share but not the whole model refuses one process and accepts the tensor-parallel load."""
    import crosschip.checkpoint.sizes as sizes

    whole = sum(p.numel() * 4 for p in crosschip.from_pretrained(root / "llama", backend="torch").parameters())
    real = sizes.device_memory_bytes
    sizes.device_memory_bytes = lambda device: whole * 3 // 4
    try:
        with pytest.raises(ConfigurationError, match="this process's weights alone need"):
            crosschip.from_pretrained(root / "llama", backend="torch")
        crosschip.from_pretrained(root / "llama", backend="torch", tp=world)
    finally:
        sizes.device_memory_bytes = real


def _check_errors(root: Path, world: int) -> None:
    with pytest.raises(ConfigurationError, match=f"tp={2 * world} x dp=1 = {2 * world} ranks does not match the world size {world}"):
        crosschip.from_pretrained(root / "llama", backend="torch", tp=2 * world)
    with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the number of query heads \(7\)"):
        crosschip.from_pretrained(root / "heads7", backend="torch", tp=2)
    with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the intermediate size \(95\)"):
        crosschip.from_pretrained(root / "inter95", backend="torch", tp=2)


def _run(rank: int, world: int, root: Path, cases) -> None:
    for name, tp in cases:
        if name == "errors":
            _check_errors(root, world)
            _check_fits_per_rank(root, world)
        elif name == "failed-save":
            _check_failed_save(root, rank)
        else:
            _check_parity(root, name, tp, rank)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    _save_models(root)
    return root


def test_tp2_matches_single_process(checkpoints):
    spawn(2, checkpoints, _run, [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("errors", 0), ("failed-save", 0)])


def test_tp4_replicating_kv_heads_matches_single_process(checkpoints):
    spawn(4, checkpoints, _run, [("llama", 4), ("qwen2", 4)])


def test_tp_without_process_group_is_a_configuration_error(checkpoints):
    with pytest.raises(ConfigurationError, match="tp=2 x dp=1 needs a process group of 2 ranks"):
        crosschip.from_pretrained(checkpoints / "llama", backend="torch", tp=2)


def test_kv_replication_round_trip_is_bitwise():
    k = torch.randn(2 * 4, 16)
    step = ReplicateHeads(("k.weight",), num_heads=2, copies=3)
    physical = step.apply({"k.weight": k, "q.weight": k})
    assert physical["k.weight"].shape == (2 * 3 * 4, 16) and physical["q.weight"] is k
    assert torch.equal(physical["k.weight"][4:8], k[:4]) and torch.equal(physical["k.weight"][12:16], k[4:])
    assert torch.equal(step.invert(physical)["k.weight"], k)


_UNDER_TORCHRUN = r"""
import sys, torch, crosschip, torch.distributed as dist
model = crosschip.from_pretrained(sys.argv[1], backend="torch", tp=2)  # no init_process_group here
assert dist.is_initialized() and dist.get_world_size() == 2
ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
logits = model(ids).logits
expected = crosschip.from_pretrained(sys.argv[1], backend="reference")(ids).logits
assert (logits - expected).abs().max() < 1e-5
sys.stdout.write(f"ok {dist.get_rank()}\n")  # one write per rank: the two ranks share the pipe
sys.stdout.flush()
"""


def test_from_pretrained_joins_the_torchrun_process_group_itself(tmp_path):
    """Under torchrun, ``from_pretrained(tp=2)`` joins the launcher's process group when the
    script made none (the README's example does not)."""
    import subprocess
    import sys

    from helpers import save_hf_llama

    save_hf_llama(tmp_path / "llama")
    script = tmp_path / "script.py"
    script.write_text(_UNDER_TORCHRUN)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "llama")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(result.stdout.split()) == ["0", "1", "ok", "ok"], result.stdout
