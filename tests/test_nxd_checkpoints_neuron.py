"""NxD sharded checkpoints written by neuronx-distributed's own ``trainer.save_checkpoint`` (in its
CPU mode, gloo) from crosschip's neuron backend, at tp 2 and 4, plain and xser, with and without
replicated KV heads, under both platforms' KV arrangements (trn1 tiled, trn2 adjacent) and with
fused and separate QKV: they consolidate bit for bit to the Hugging Face weights that were
sharded, with the metadata and without it (from the config and the named layout), and load
directly with ``from_pretrained``. And the training state ``crosschip train`` saves on the
neuron backend is such a checkpoint: NxD's own loader reads it, and it consolidates to the
weights saved beside it.

Marked ``neuron_cpu``: skipped without neuronx-distributed, failing where
``CROSSCHIP_REQUIRE_HARDWARE=neuron-cpu`` says it must run (CI)."""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosschip.checkpoint.convert import convert
from gloo_spawn import spawn
from helpers import save_hf_llama

pytestmark = pytest.mark.neuron_cpu

MODELS = ("kv2", "kv1")  # 8 query heads; 2 KV heads split at tp=2, replicated at tp=4; 1 always replicated


def _save_shards(rank: int, world: int, root: Path, platform: str) -> None:
    os.environ.update(NXD_CPU_MODE="1", NEURON_PLATFORM_TARGET_OVERRIDE=platform)
    import crosschip
    from crosschip_neuron.nxd_checkpoint import local_state, metadata
    from nxd_checkpoints import save_with_nxd

    for name in MODELS:
        for fused in ("1", "0"):
            os.environ["CROSSCHIP_NEURON_FUSE_QKV"] = fused
            model = crosschip.from_pretrained(root / name, backend="neuron", tp=world, strict=True)
            for xser in (False, True):
                out = root / f"{name}-tp{world}-{platform}-fused{fused}-{'xser' if xser else 'plain'}"
                save_with_nxd(out, "shards", local_state(model), None, use_xser=xser)
                if rank == 0:
                    (out / "shards" / "mp_metadata_pp_rank_0.json").write_text(
                        json.dumps(metadata(model, model.runtime).to_json()))
                    shutil.copy(root / name / "config.json", out / "config.json")
            del model
            gc.collect()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("nxd")
    save_hf_llama(root / "kv2")
    save_hf_llama(root / "kv1", num_key_value_heads=1)
    for world in (2, 4):
        for platform in ("trn1", "trn2"):
            spawn(world, root, _save_shards, platform)
    return root


def _assert_bitwise(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys(), sorted(set(expected) ^ set(got))
    for key in expected:
        assert expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]), key


def _variants(root: Path):
    return sorted(p for p in root.iterdir() if p.name.startswith(MODELS) and "-tp" in p.name)


def test_nxd_save_checkpoint_consolidates_bitwise(saved, tmp_path):
    variants = _variants(saved)
    assert len(variants) == 2 * 2 * 2 * 2 * 2
    for source in variants:
        name = source.name.split("-")[0]
        xser = source.name.endswith("xser")
        model_dir = source / "shards" / "model"
        assert (Path(f"{model_dir / 'dp_rank_00_tp_rank_00_pp_rank_00.pt'}.tensors").is_dir()) == xser, source
        summary = convert(source, tmp_path / source.name, progress=False)
        assert summary.source_format.startswith(f"nxd ({'xser' if xser else 'plain'}"), summary.source_format
        _assert_bitwise(load_file(saved / name / "model.safetensors"), load_file(tmp_path / source.name / "model.safetensors"))
        replicated = name == "kv1" or "-tp4-" in source.name
        layout = summary.notes[-1]
        assert ("copies" in layout and "x 1 copies" not in layout) == replicated, (source.name, layout)
        if replicated and name == "kv2":  # one KV head reads the same under both arrangements
            assert ("(interleave)" if "trn2" in source.name else "(tile)") in layout, (source.name, layout)


def test_without_metadata_the_named_layout_consolidates(saved, tmp_path):
    for platform, layout in (("trn1", "tile"), ("trn2", "interleave")):
        source = tmp_path / platform
        shutil.copytree(saved / f"kv2-tp4-{platform}-fused1-xser", source)
        (source / "shards" / "mp_metadata_pp_rank_0.json").unlink()
        convert(source, tmp_path / f"out-{platform}", kv_layout=layout, progress=False)
        _assert_bitwise(load_file(saved / "kv2" / "model.safetensors"),
                        load_file(tmp_path / f"out-{platform}" / "model.safetensors"))


def test_from_pretrained_reads_nxd_xser_shards(saved):
    import crosschip

    ids = torch.randint(0, 128, (2, 10))
    expected = crosschip.from_pretrained(saved / "kv1", backend="reference")
    loaded = crosschip.from_pretrained(saved / "kv1-tp4-trn2-fused0-xser", backend="reference")
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, loaded(ids).logits)


def _train_and_read(rank: int, world: int, root: Path) -> None:
    os.environ.update(NXD_CPU_MODE="1", NEURON_PLATFORM_TARGET_OVERRIDE="trn1")
    from crosschip.checkpoint.nxd.files import NxdCheckpoint
    from crosschip.training.train import TrainArgs, train
    from nxd_checkpoints import load_with_nxd

    train(TrainArgs(model=str(root / "kv1"), backend="neuron", tp=world, out=str(root / "run"), steps=2,
                    batch_size=2, seq_len=16, seed=3), progress=False)
    state = root / "run" / "training_state"
    ours = NxdCheckpoint(state).tensors(0, rank)
    # NxD's own loader (it unpickles without weights_only: used here only on files this test wrote).
    theirs, optim = load_with_nxd(state, "shards", {k: None for k in ours.keys()}, use_xser=False,
                                  optimizer_template={})
    for key in ours.keys():
        assert torch.equal(theirs[key], ours.get(key)), key
    assert set(optim) == {"state", "param_groups"} and len(optim["state"]) == len(ours.keys())


def test_neuron_training_state_is_an_nxd_checkpoint(tmp_path):
    save_hf_llama(tmp_path / "kv1", num_key_value_heads=1, vocab_size=258)
    spawn(2, tmp_path, _train_and_read)
    state = tmp_path / "run" / "training_state"
    assert json.loads((state / "meta.json").read_text())["format"] == "nxd"
    assert sorted(p.name for p in (state / "shards" / "optim").iterdir()) == [
        "dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_01_pp_rank_00.pt"]
    convert(state, tmp_path / "consolidated", config=tmp_path / "run", progress=False)
    _assert_bitwise(load_file(tmp_path / "run" / "model.safetensors"),
                    load_file(tmp_path / "consolidated" / "model.safetensors"))


def _optimum_reads(rank: int, world: int, root: Path, out: str) -> None:
    from optimum_neuron import consolidate

    out = Path(out)
    for name in MODELS:
        hf = load_file(root / name / "model.safetensors")
        for tp in (1, 2, 4):
            for fuse in (False, True):
                target = out / f"{name}-{tp}-{fuse}"
                convert(root / name, target, tp=tp, fuse_qkv=fuse, progress=False)
                _assert_bitwise(hf, consolidate(target / "shards"))
        for source in _variants(root):
            if not source.name.startswith(f"{name}-") or not source.name.endswith("plain"):
                continue
            if name == "kv2" and "-tp4-trn2-" in source.name:
                with pytest.raises(TypeError, match="kv_layout"):
                    consolidate(source / "shards")
            else:
                _assert_bitwise(hf, consolidate(source / "shards"))


def test_optimum_neuron_consolidates_what_crosschip_writes(saved, tmp_path):
    """Optimum Neuron's own consolidation reads the shards ``crosschip convert`` writes and those
    of the neuron backend, bit for bit; the one arrangement it cannot reverse (trn2's adjacent
    copies of several KV heads) it refuses, on the metadata's ``kv_layout``, instead of
    consolidating it wrongly. (In its own process: importing Optimum Neuron needs NxD's CPU-mode
    stand-ins, which the rest of the suite's process must not see.)"""
    from optimum_neuron import available

    available()  # a skip, or a failure where CROSSCHIP_REQUIRE_HARDWARE asks for it
    spawn(1, saved, _optimum_reads, str(tmp_path))
