"""The neuron backend's probe, strict mode and single-process use. The probe never imports
neuronx-distributed and tells three situations apart: a Trainium host, NxD's CPU mode, and
neither (with the reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosschip_neuron import cpu_mode, plugin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_sdk(monkeypatch):
    monkeypatch.setattr(cpu_mode, "sdk_installed", lambda: False)
    monkeypatch.setattr(cpu_mode, "nxd_installed", lambda: True)
    monkeypatch.setattr(plugin, "_nxd_version", lambda: ("0.18.0+fbac349b", (0, 18, 0)))


def test_probe_reports_cpu_mode_and_why_it_is_off(no_sdk, monkeypatch):
    monkeypatch.delenv("NXD_CPU_MODE", raising=False)
    off = plugin.probe()
    assert not off.available and "NxD's CPU mode is off (set NXD_CPU_MODE=1" in off.reason
    monkeypatch.setenv("NXD_CPU_MODE", "1")
    on = plugin.probe()
    assert on.available and on.reason.startswith("NxD CPU mode (NXD_CPU_MODE=1)")


def test_probe_refuses_a_missing_or_old_nxd(no_sdk, monkeypatch):
    monkeypatch.setenv("NXD_CPU_MODE", "1")
    monkeypatch.setattr(plugin, "_nxd_version", lambda: ("0.9.0", (0, 9, 0)))
    old = plugin.probe()
    assert not old.available and old.reason == ("neuronx-distributed 0.9.0 is older than 0.18, which this "
                                                "backend needs")
    monkeypatch.setattr(cpu_mode, "nxd_installed", lambda: False)
    missing = plugin.probe()
    assert not missing.available and missing.reason.startswith("neuronx_distributed is not installed")


def test_probe_with_the_sdk_needs_devices(no_sdk, monkeypatch):
    monkeypatch.delenv("NXD_CPU_MODE", raising=False)
    monkeypatch.setattr(cpu_mode, "sdk_installed", lambda: True)
    monkeypatch.setattr(plugin.glob, "glob", lambda pattern: [])
    assert "no Neuron device (/dev/neuron*) present" in plugin.probe().reason
    monkeypatch.setattr(plugin.glob, "glob", lambda pattern: ["/dev/neuron0"])
    assert plugin.probe() == plugin.Probe(True, "Neuron SDK importable and Neuron devices present")


def test_probe_imports_nothing_of_nxd():
    code = ("import sys; from crosschip_neuron.plugin import probe; probe(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('neuronx_distributed', 'torch_xla', 'torch_neuronx', 'neuronxcc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NXD_CPU_MODE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_strict_neuron_never_falls_back(tmp_path, monkeypatch):
    """With neuron asked for and unavailable, strict mode refuses instead of building elsewhere."""
    import crosschip
    from crosschip.errors import StrictFallbackError
    from helpers import save_hf_llama

    monkeypatch.delenv("NXD_CPU_MODE", raising=False)
    save_hf_llama(tmp_path / "llama")
    with pytest.raises(StrictFallbackError, match=r"embedding .* fell back to the reference backend \(neuron: "
                                                  r"unavailable: "):
        crosschip.from_pretrained(tmp_path / "llama", backend="neuron", strict=True)


_ONE_PROCESS = r"""
import json, sys, torch, crosschip
path = sys.argv[1]
ref = crosschip.from_pretrained(path, backend="reference")
model = crosschip.from_pretrained(path, backend="neuron", strict=True)
ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
err = (model(ids).logits - ref(ids).logits).abs().max().item()
same = torch.equal(model.generate(ids[:, :4], max_new_tokens=4), ref.generate(ids[:, :4], max_new_tokens=4))
built = sorted({d.backend for d in model.runtime.report.decisions})
# A packed row (two documents, positions restarting): each document's logits as alone, and the
# row's loss and gradients those of the documents trained alone (each weighted by its targets).
model.train()
docs = [ids[0, :5], ids[1, :7]]
row, labels = torch.cat(docs)[None], torch.cat(docs)[None].clone()
labels[0, 5] = -100  # the second document's first token is no target of the first
packed = model(row, labels=labels, position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
               document_ids=torch.tensor([[0] * 5 + [1] * 7]))
packed.loss.backward()
packed_grads = {k: g.clone() for k, g in model.hf_grads().items()}
model.zero_grad()
alone, loss = [], 0.0
for d in docs:
    out = model(d[None], labels=d[None])
    (out.loss * (len(d) - 1) / 10).backward()
    alone.append(out.logits)
    loss += out.loss.item() * (len(d) - 1) / 10
rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
packed_err = max(rel(packed.logits, torch.cat(alone, dim=1)), abs(packed.loss.item() - loss) / loss,
                 *(rel(packed_grads[k], g) for k, g in model.hf_grads().items()))
print(json.dumps({"err": err, "same": same, "built": built, "packed": packed_err,
                  "world": torch.distributed.get_world_size()}))
"""


@pytest.mark.neuron_cpu
def test_one_process_without_a_launcher(tmp_path):
    """tp=1 needs no torchrun: the backend gives NxD its one-rank (in-memory gloo) group. Also
    packed rows there (document_ids), as on the other CPU backends (tests/test_packing.py)."""
    from helpers import save_hf_llama

    save_hf_llama(tmp_path / "llama")
    out = subprocess.run([sys.executable, "-c", _ONE_PROCESS, str(tmp_path / "llama")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={**os.environ, "NXD_CPU_MODE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5 and result["same"] and result["packed"] < 1e-5, result
    assert result["built"] == ["neuron", "reference"] and result["world"] == 1, result


_CONFORMANCE = r"""
import json, torch
from crosschip.testing import conformance
out = {}
for dtype in (torch.float32, torch.bfloat16):
    report = conformance.check_backend("neuron", dtype=dtype)
    out[str(dtype)] = {"passed": len(report.passed), "failed": [str(o) for o in report.failed],
                       "declined": sorted({(o.case.component, o.case.label) for o in report.declined})}
print(json.dumps(out))
"""


@pytest.mark.neuron_cpu
def test_neuron_passes_the_conformance_kit_in_cpu_mode():
    """Every component against the reference oracle and every layout round trip, at tp=1 (in its
    own process: NxD's one-rank group is process-global)."""
    out = subprocess.run([sys.executable, "-c", _CONFORMANCE], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "NXD_CPU_MODE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    for dtype, result in json.loads(out.stdout.strip().splitlines()[-1]).items():
        assert result["failed"] == [], (dtype, result["failed"])
        # Only the replicated (non-attention) projection, which NxD's RowParallelLinear is not.
        assert result["declined"] == [["out_projection", "plain"]], (dtype, result["declined"])
        assert result["passed"] == 31, (dtype, result)  # 15 cases x (parity, layout) + descriptor


def test_stand_ins_never_replace_an_installed_module(tmp_path):
    """With a (here: fake) torch_xla installed, CPU mode registers stand-ins only for what is
    missing; the installed module stays the one imported."""
    (tmp_path / "torch_xla").mkdir()
    (tmp_path / "torch_xla" / "__init__.py").write_text("REAL = True\n")
    code = ("import sys; from crosschip_neuron import cpu_mode; cpu_mode._install_standins(); "
            "import torch_xla, torch_neuronx; print(getattr(torch_xla, 'REAL', False), "
            "getattr(torch_neuronx, '__crosschip_standin__', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stdout


_ADAPTER = r"""
import json, sys
import crosschip
from crosschip.errors import ConfigurationError
model = crosschip.from_pretrained(sys.argv[1], backend="neuron")
try:
    model.add_adapter(crosschip.LoraConfig(target_modules=("q_proj", "lm_head")))
    print(json.dumps({"error": None}))
except ConfigurationError as exc:
    print(json.dumps({"error": str(exc), "clean": getattr(model, "lora_adapter", None) is None}))
"""


@pytest.mark.neuron_cpu
def test_adapters_are_declined_with_the_reason(tmp_path):
    """The neuron backend's LM head carries no adapter yet: asking for one names the projection,
    the backend and why, and leaves the model as it was (q_proj included)."""
    from helpers import save_hf_llama

    save_hf_llama(tmp_path / "llama")
    out = subprocess.run([sys.executable, "-c", _ADAPTER, str(tmp_path / "llama")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={**os.environ, "NXD_CPU_MODE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] and "lm_head (lm_head)" in result["error"], result
    assert "backend 'neuron'" in result["error"] and "LM head takes no adapter" in result["error"], result
    assert result["clean"], result
