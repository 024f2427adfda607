"""The staged loader (checkpoint bytes read once and put in place on the model's device) loads
exactly what the layout transforms give, bitwise, for every family, backend, dtype pair and
piece size; it reads only whole-tensor bytes it places; and a file cut short under it is an
error naming the file and the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import crosschip
from crosschip import CheckpointError
from crosschip.checkpoint import SafetensorsCheckpoint, staged_read
from crosschip.checkpoint.loading import build_model, load_config
from crosschip.runtime import Runtime
from crosschip import weights
from helpers import save_hf_llama
from zoo import save_hf, zoo_configs


def _through_transforms(monkeypatch):
    """Make ``from_pretrained`` load every component through its transforms (the oracle)."""
    monkeypatch.setattr(staged_read, "load_placed", lambda bindings, source: list(bindings))


def _load_both(path, monkeypatch, **options):
    staged = crosschip.from_pretrained(path, **options)
    with monkeypatch.context() as patch:
        _through_transforms(patch)
        oracle = crosschip.from_pretrained(path, **options)
    return staged, oracle


def _assert_same_state(model, oracle):
    got, expected = model.state_dict(), oracle.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        if name.endswith("_extra_state"):
            continue
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].cpu(), tensor.cpu()), name  # a GPU load against a CPU one too


@pytest.mark.parametrize("family", sorted(zoo_configs()))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_family_loads_bitwise_as_through_the_transforms(tmp_path, monkeypatch, family, backend):
    config, _ = zoo_configs()[family]
    save_hf(tmp_path, config)
    staged, oracle = _load_both(tmp_path, monkeypatch, backend=backend)
    _assert_same_state(staged, oracle)


def test_llamas_interleaved_layout_goes_through_the_staged_loader(tmp_path):
    """Not vacuous: on the torch backend every Llama component is placed by the staged loader,
    the combined QKV and the gate/up interleave by indexed copies."""
    save_hf_llama(tmp_path)
    cls, config = load_config(tmp_path)
    model = build_model(cls, config, Runtime("torch", device="cpu"))
    source = SafetensorsCheckpoint(tmp_path)
    pieces, rest = staged_read.plan(weights.check_source(model, source), source)
    assert rest == []
    assert {p.key for p in pieces} == set(source.keys())
    interleaved = {p.key for p in pieces if p.direct is None}
    assert "model.layers.0.mlp.gate_proj.weight" in interleaved
    assert "model.layers.1.self_attn.k_proj.weight" in interleaved
    assert "model.embed_tokens.weight" not in interleaved


@pytest.mark.parametrize("stored, loaded", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                            (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("chunk_bytes, buffers", [(16 * 2**20, 8), (200, 2), (1, 1)])
def test_dtypes_and_piece_sizes(tmp_path, monkeypatch, stored, loaded, chunk_bytes, buffers):
    """Pieces of one row (or a few hundred bytes) cut QKV groups and gate/up pairs anywhere; one
    staging buffer makes every read wait for the previous piece's copy."""
    save_hf_llama(tmp_path, num_hidden_layers=1)
    tensors = load_file(tmp_path / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.to(stored) for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(staged_read, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(staged_read, "BUFFERS", buffers)
    staged, oracle = _load_both(tmp_path, monkeypatch, backend="torch", dtype=loaded)
    _assert_same_state(staged, oracle)
    assert {p.dtype for p in staged.parameters()} == {loaded}
    assert staged.checkpoint_bytes_read == sum(t.numel() * stored.itemsize for t in tensors.values())


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_the_staging_path_of_cuda_run_on_the_cpu_is_bitwise(tmp_path, stored):
    """Every piece through a staging buffer, as on CUDA (direct pieces copied out of it into the
    parameter), with two buffers reused many times."""
    save_hf_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.to(stored) for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cls, config = load_config(tmp_path)
    model = build_model(cls, config, Runtime("torch", device="cpu", dtype=torch.bfloat16))
    source = SafetensorsCheckpoint(tmp_path)
    pieces, rest = staged_read.plan(weights.check_source(model, source), source, chunk_bytes=300)
    assert rest == [] and any(p.direct is None for p in pieces)
    # same dtype: the embedding, norms, o_proj and down_proj go straight in; a cast never does
    assert any(p.direct is not None for p in pieces) is (stored == torch.bfloat16)
    reader = staged_read.StagedReader("cpu", source, buffers=2, stage_everything=True)
    reader.run(pieces)
    for key, tensor in model.hf_state_dict().items():
        assert torch.equal(tensor, tensors[key].to(stored).to(torch.bfloat16)), key
    assert source.bytes_read == sum(t.numel() * stored.itemsize for t in tensors.values())


def test_sharded_checkpoint_loads_bitwise(tmp_path, monkeypatch):
    save_hf_llama(tmp_path / "in")
    model = crosschip.from_pretrained(tmp_path / "in", backend="torch")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(set(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 2
    for backend in ("reference", "torch"):
        staged, oracle = _load_both(tmp_path / "sharded", monkeypatch, backend=backend)
        _assert_same_state(staged, oracle)
        for key, tensor in load_file(tmp_path / "in" / "model.safetensors").items():
            assert torch.equal(staged.hf_state_dict()[key], tensor), key


def test_a_file_cut_short_after_opening_names_file_and_key(tmp_path):
    save_hf_llama(tmp_path)
    cls, config = load_config(tmp_path)
    model = build_model(cls, config, Runtime("torch", device="cpu"))
    source = SafetensorsCheckpoint(tmp_path)
    source.keys()  # opened and its header read, as from_pretrained does before loading
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '[^']+' \(F32 \[\d+(, \d+)*\]\) needs "
                                              r"bytes \d+\.\.\d+, found a file of \d+ bytes \(truncated\?\)"):
        weights.load_canonical(model, source)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "te"])
@pytest.mark.parametrize("stored, loaded", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_cuda_load_is_bitwise_the_cpu_load(tmp_path, monkeypatch, request, backend, stored, loaded):
    """On the GPU, pinned staging and indexed copies on the device give the CPU load's weights
    (torch: the same physical state; te, absent on CPU: the checkpoint itself, back through its
    layout), and the GPU load through the transforms agrees too."""
    if backend == "te":
        request.getfixturevalue("te_installed")
    save_hf_llama(tmp_path, vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2)  # test_cuda.py's te sizes
    from safetensors.torch import save_file

    tensors = {k: v.to(stored) for k, v in load_file(tmp_path / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(staged_read, "CHUNK_BYTES", 4096)  # many pieces, staging buffers reused
    options = dict(backend=backend, dtype=loaded)
    on_gpu, oracle = _load_both(tmp_path, monkeypatch, device="cuda", **options)
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    for component in ("qkv_projection", "gated_mlp"):  # the layouts under test are the backend's own
        assert on_gpu.runtime.report.backends_for(component) == {backend}, component
    source = SafetensorsCheckpoint(tmp_path)
    pieces, rest = staged_read.plan(weights.check_source(on_gpu, source), source)
    assert not rest, f"components left to the transforms on {backend}: {[b.path for b in rest]}"
    assert any(p.direct is None for p in pieces)  # the grouped QKV: an indexed copy on the GPU
    _assert_same_state(on_gpu, oracle)
    if backend == "torch":
        _assert_same_state(on_gpu, crosschip.from_pretrained(tmp_path, device="cpu", **options))
    canonical = on_gpu.hf_state_dict()
    for key, tensor in tensors.items():
        assert torch.equal(canonical[key].cpu(), tensor.to(loaded)), key


_MEASURE = """
import json, sys, torch, crosschip
crosschip.from_pretrained(sys.argv[2], backend="torch", dtype=torch.bfloat16)  # imports, plugins
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS", "RssFile")}
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM restarts here
before = status()
model = crosschip.from_pretrained(sys.argv[1], backend="torch", dtype=torch.bfloat16)
after = status()
held = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(peak=after["VmHWM"] - before["VmRSS"], file=after["RssFile"] - before["RssFile"], held=held)))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_host_memory_of_a_load_is_the_model_plus_bounded_staging(tmp_path):
    """A single-device CPU load's peak resident growth is the parameters plus at most the staging
    buffers (and some slack for the allocator and index tensors): no second copy of any tensor,
    and the file is not mapped in (its pages do not count against the process)."""
    import os
    import subprocess
    import sys

    # about 370 MB in bf16, stored in float32: every piece is cast, so all go through staging
    save_hf_llama(tmp_path / "big", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)
    save_hf_llama(tmp_path / "small")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "big"), str(tmp_path / "small")],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    staging = staged_read.BUFFERS * staged_read.CHUNK_BYTES
    assert measured["held"] > 2 * staging  # large enough that a second copy would show
    assert measured["peak"] <= measured["held"] + staging + 48 * 2**20, measured
    assert measured["file"] <= 16 * 2**20, measured
