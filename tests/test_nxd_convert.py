"""``crosschip convert`` between Hugging Face checkpoints and neuronx-distributed (NxD) shards, on
the core alone (no NxD import): bitwise round trips at tp 1, 2 and 4 for every Llama-family model
of the zoo (biases, q/k norms, tied embeddings, one KV head), with fused and separate QKV and
both KV-replica layouts; the shard layout's defining properties; the consolidated checkpoint in
transformers; metadata-free consolidation from a named config and layout; and hostile or broken
inputs, each refused with a message naming the file, and nothing written.

Shards written by NxD's own ``trainer.save_checkpoint`` (and crosschip's neuron backend) are
tested in ``test_nxd_checkpoints_neuron.py``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosschip.checkpoint.nxd.heads import kv_order, query_order
from crosschip.checkpoint.nxd.metadata import GQAQKV
from crosschip.cli import main
from crosschip.checkpoint.convert import convert
from crosschip.errors import CheckpointError, ConfigurationError
from helpers import save_hf_llama

MODELS = ("llama", "kv1", "qwen2_bias", "qwen3_qknorm", "granite_bias_tied", "mha")


def _save(name: str, path: Path, dtype=torch.float32):
    from transformers import GraniteConfig, Qwen2Config, Qwen3Config

    from zoo import BASE, save_hf

    if name == "llama":
        model = save_hf_llama(path)
    elif name == "kv1":
        model = save_hf_llama(path, num_key_value_heads=1)
    elif name == "mha":
        model = save_hf_llama(path, num_key_value_heads=8)
    elif name == "qwen2_bias":
        model = save_hf(path, Qwen2Config(**BASE))
    elif name == "qwen3_qknorm":
        model = save_hf(path, Qwen3Config(**BASE, head_dim=16))
    else:
        model = save_hf(path, GraniteConfig(**{**BASE, "tie_word_embeddings": True}, attention_bias=True, mlp_bias=True))
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name in MODELS:
        _save(name, root / name)
    _save("llama", root / "llama_bf16", torch.bfloat16)
    return root


def _weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_is_bitwise(models, tmp_path, name, tp):
    for fuse in (False, True):
        for layout in ("tile", "interleave"):
            shards, back = tmp_path / f"nxd-{fuse}-{layout}", tmp_path / f"hf-{fuse}-{layout}"
            convert(models / name, shards, tp=tp, kv_layout=layout, fuse_qkv=fuse, progress=False)
            files = sorted(p.name for p in (shards / "shards" / "model").iterdir())
            assert files == [f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt" for r in range(tp)]
            summary = convert(shards, back, progress=False)
            assert_bitwise(_weights(models / name), _weights(back))
            assert json.loads((back / "config.json").read_text()) == json.loads((models / name / "config.json").read_text())
            assert summary.tensors == len(_weights(back))


def test_bf16_round_trip(models, tmp_path):
    convert(models / "llama_bf16", tmp_path / "nxd", tp=4, progress=False)
    convert(tmp_path / "nxd", tmp_path / "hf", progress=False)
    assert_bitwise(_weights(models / "llama_bf16"), _weights(tmp_path / "hf"))
    assert _weights(tmp_path / "hf")["model.norm.weight"].dtype == torch.bfloat16


def test_shards_follow_optimum_neurons_layout(models, tmp_path):
    """tp=4 over 2 KV heads: each rank holds one KV head (tiled: head r mod 2, as Optimum Neuron and
    NxD on trn1 place it) and a quarter of the query heads, all from that head's group; the
    gate_up shard is [gate rows of r; up rows of r]; o_proj's columns follow the queries."""
    convert(models / "llama", tmp_path / "nxd", tp=4, progress=False)
    hf = _weights(models / "llama")
    d, group = 8, 4
    for r in range(4):
        state = torch.load(tmp_path / "nxd" / "shards" / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt",
                           weights_only=True)
        p = "model.layers.0."
        kv_head = r % 2
        assert torch.equal(state[p + "self_attn.qkv_proj.weight_k"], hf[p + "self_attn.k_proj.weight"][kv_head * d:(kv_head + 1) * d])
        q = state[p + "self_attn.qkv_proj.weight_q"].unflatten(0, (-1, d))
        q_heads = [next(h for h in range(8) if torch.equal(q[i], hf[p + "self_attn.q_proj.weight"][h * d:(h + 1) * d]))
                   for i in range(2)]
        assert all(h // group == kv_head for h in q_heads), (r, q_heads)
        o = state[p + "self_attn.o_proj.weight"]
        assert torch.equal(o, torch.cat([hf[p + "self_attn.o_proj.weight"][:, h * d:(h + 1) * d] for h in q_heads], 1))
        rows = 96 // 4
        gate_up = state[p + "mlp.gate_up_proj.weight"]
        assert torch.equal(gate_up[:rows], hf[p + "mlp.gate_proj.weight"][r * rows:(r + 1) * rows])
        assert torch.equal(gate_up[rows:], hf[p + "mlp.up_proj.weight"][r * rows:(r + 1) * rows])
    served = [h for r in range(4) for h in query_order(GQAQKV("m", "qkv_proj", "q", "k", "v", "o", 8, 2, 2, 16, 8,
                                                                False, False, 4))[2 * r:2 * r + 2]]
    assert sorted(served) == list(range(8))


def test_interleave_keeps_copies_adjacent_and_queries_in_order():
    spec = GQAQKV("m", "qkv_proj", "q", "k", "v", "o", 8, 2, 2, 16, 8, False, False, 4, "interleave")
    assert kv_order(spec) == [0, 0, 1, 1] and query_order(spec) == list(range(8))
    tiled = GQAQKV("m", "qkv_proj", "q", "k", "v", "o", 8, 2, 2, 16, 8, False, False, 4)
    assert kv_order(tiled) == [0, 1, 0, 1] and query_order(tiled) == [0, 1, 4, 5, 2, 3, 6, 7]


def test_consolidated_checkpoint_loads_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    convert(models / "qwen2_bias", tmp_path / "nxd", tp=4, progress=False)
    convert(tmp_path / "nxd", tmp_path / "hf", progress=False)
    ids = torch.randint(0, 128, (2, 12))
    original = AutoModelForCausalLM.from_pretrained(models / "qwen2_bias").eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)


def _strip_metadata(shards: Path) -> None:
    (shards / "shards" / "mp_metadata_pp_rank_0.json").unlink()
    (shards / "config.json").unlink()
    os.unlink(shards / "generation_config.json")


def test_without_metadata_the_config_and_layout_are_named(models, tmp_path):
    for layout in ("tile", "interleave"):
        shards = tmp_path / f"nxd-{layout}"
        convert(models / "llama", shards, tp=4, kv_layout=layout, progress=False)
        _strip_metadata(shards)
        with pytest.raises(CheckpointError, match="no mp_metadata_pp_rank_0.json.*--config"):
            convert(shards, tmp_path / "out", progress=False)
        with pytest.raises(CheckpointError, match="name the layout"):
            convert(shards, tmp_path / "out", config=models / "llama", progress=False)
        other = "interleave" if layout == "tile" else "tile"
        with pytest.raises(CheckpointError, match="copies of KV head .* differ"):
            convert(shards, tmp_path / "out", config=models / "llama", kv_layout=other, progress=False)
        assert not (tmp_path / "out").exists()
        convert(shards, tmp_path / f"hf-{layout}", config=models / "llama" / "config.json", kv_layout=layout,
                progress=False)
        assert_bitwise(_weights(models / "llama"), _weights(tmp_path / f"hf-{layout}"))


def test_without_metadata_nothing_replicated_needs_no_layout(models, tmp_path):
    convert(models / "qwen2_bias", tmp_path / "nxd", tp=2, progress=False)
    _strip_metadata(tmp_path / "nxd")
    convert(tmp_path / "nxd", tmp_path / "hf", config=models / "qwen2_bias", progress=False)
    assert_bitwise(_weights(models / "qwen2_bias"), _weights(tmp_path / "hf"))


# -- bad input ----------------------------------------------------------------------------------
@pytest.fixture
def sharded(models, tmp_path):
    convert(models / "llama", tmp_path / "nxd", tp=2, progress=False)
    return tmp_path / "nxd" / "shards"


def _rank(tag: Path, r: int) -> Path:
    return tag / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/crosschip-pwned",))


def _refused(source, out: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        convert(source, out, progress=False)
    assert not out.exists(), "a refused conversion wrote something"


def test_a_pickle_that_would_run_code_is_refused(sharded, tmp_path):
    state = torch.load(_rank(sharded, 1), weights_only=True)
    state["payload"] = _RunsCode()
    torch.save(state, _rank(sharded, 1))
    _refused(sharded, tmp_path / "out", r"tp_rank_01.*needs the global (posix|os)\.system.*refusing")
    assert not Path("/tmp/crosschip-pwned").exists()


def test_an_xser_reference_file_with_another_global_is_refused(sharded, tmp_path, monkeypatch):
    """An xser checkpoint's reference pickle may hold TensorReference objects and nothing else
    (written here through a module standing for torch_xla's, as NxD pickles them)."""
    module = types.ModuleType("torch_xla.utils.serialization")
    for name in ("torch_xla", "torch_xla.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)

    class TensorReference:
        def __init__(self, tid):
            self.tid = tid

    TensorReference.__module__, TensorReference.__qualname__ = module.__name__, "TensorReference"
    module.TensorReference = TensorReference
    if True:
        for r in range(2):
            state = torch.load(_rank(sharded, r), weights_only=True)
            folder = Path(f"{_rank(sharded, r)}.tensors")
            folder.mkdir()
            refs = {}
            for i, (key, tensor) in enumerate(state.items()):
                torch.save(tensor.clone(), folder / f"tensor_{i}.pt")
                refs[key] = TensorReference(i)
            torch.save(refs, _rank(sharded, r))
        convert(sharded, tmp_path / "ok", progress=False)  # a well-formed xser checkpoint reads
        refs["model.norm.weight"] = _RunsCode()
        torch.save(refs, _rank(sharded, 1))
        _refused(sharded, tmp_path / "out", "needs the global .*system")
        refs["model.norm.weight"] = TensorReference(-1)
        torch.save(refs, _rank(sharded, 1))
        _refused(sharded, tmp_path / "out", "'model.norm.weight' holds a TensorReference, expected an xser")
    assert_bitwise(_weights(tmp_path / "ok"), load_file(tmp_path / "ok" / "model.safetensors"))


def test_truncated_missing_and_unfinished_rank_files(sharded, tmp_path):
    data = _rank(sharded, 1).read_bytes()
    _rank(sharded, 1).write_bytes(data[: len(data) // 2])
    _refused(sharded, tmp_path / "out", "tp_rank_01.*truncated or corrupt")
    _rank(sharded, 1).unlink()
    shutil.copy(_rank(sharded, 0), sharded / "model" / "dp_rank_00_tp_rank_02_pp_rank_00.pt")
    _refused(sharded, tmp_path / "out", "dp_rank_00_tp_rank_01_pp_rank_00.pt missing")
    (sharded / "done").unlink()
    _refused(sharded, tmp_path / "out", "no 'done' marker")


def test_ranks_of_mixed_tp_are_refused(models, sharded, tmp_path):
    convert(models / "llama", tmp_path / "tp4", tp=4, progress=False)
    for r in (2, 3):
        shutil.copy(_rank(tmp_path / "tp4" / "shards", r), _rank(sharded, r))
    # At tp=2 the 2 KV heads split, at tp=4 they are replicated: other modules, other names.
    _refused(sharded, tmp_path / "out", "holds other parameters than .*not one save")
    # With one KV head both saves have the same names and only the shapes tell them apart.
    convert(models / "kv1", tmp_path / "kv1-tp2", tp=2, progress=False)
    convert(models / "kv1", tmp_path / "kv1-tp4", tp=4, progress=False)
    sharded = tmp_path / "kv1-tp2" / "shards"
    for r in (2, 3):
        shutil.copy(_rank(tmp_path / "kv1-tp4" / "shards", r), _rank(sharded, r))
    _refused(sharded, tmp_path / "out", "shards of shapes .* different tp degrees")
    _rank(sharded, 2).unlink()
    _rank(sharded, 3).unlink()
    shutil.copy(_rank(tmp_path / "kv1-tp4" / "shards", 1), _rank(sharded, 1))
    _refused(sharded, tmp_path / "out", "shards of shapes .* different tp degrees")


def _edit_metadata(tag: Path, edit) -> None:
    path = tag / "mp_metadata_pp_rank_0.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_metadata_that_disagrees_with_the_tensors(sharded, tmp_path):
    original = (sharded / "mp_metadata_pp_rank_0.json").read_text()
    cases = [
        (lambda d: d["parameters"]["model.norm.weight"].update(tensor_model_parallel="yes"),
         "'tensor_model_parallel' must be a bool"),
        (lambda d: d["parameters"].pop("model.norm.weight"), "'model.norm.weight' is in the rank files but not in"),
        (lambda d: d["parameters"].update({"model.extra.weight": {"tensor_model_parallel": False}}),
         r"lists \['model.extra.weight'\]"),
        (lambda d: d["parameters"]["model.embed_tokens.weight"].update(num_partitions=4), "split into 4 partitions"),
        (lambda d: d["model_weight_transformation_specs"][0]["specs"][0][1].update(original_dims=[100, 100]),
         "FusedLinearsSpec expects"),
        (lambda d: d["model_weight_transformation_specs"][0]["specs"].__setitem__(0, ["EvilSpec", {}]),
         "unknown transformation spec 'EvilSpec'"),
        (lambda d: d["model_weight_transformation_specs"][0]["specs"][0][1].update(peft_type="lora"),
         "PEFT .* adapter"),
        (lambda d: d.update(extra=1), "expected the keys"),
    ]
    for edit, match in cases:
        (sharded / "mp_metadata_pp_rank_0.json").write_text(original)
        _edit_metadata(sharded, edit)
        _refused(sharded, tmp_path / "out", match)
    (sharded / "mp_metadata_pp_rank_0.json").write_text("{\"parameters\": NaN}")
    _refused(sharded, tmp_path / "out", "not valid JSON")


def test_gqa_metadata_sizes_must_match(models, tmp_path):
    convert(models / "llama", tmp_path / "nxd", tp=4, progress=False)
    tag = tmp_path / "nxd" / "shards"
    spec = lambda d: next(s for m in d["model_weight_transformation_specs"] for s in m["specs"]  # noqa: E731
                          if s[0] == "GQAQKVColumnParallelLinearSpec")[1]
    _edit_metadata(tag, lambda d: spec(d).update(kv_size_multiplier=4))
    _refused(tag, tmp_path / "out", "GQAQKVColumnParallelLinearSpec sizes disagree")


def test_files_outside_the_checkpoint_are_not_read(sharded, tmp_path):
    outside = tmp_path / "elsewhere.pt"
    shutil.move(_rank(sharded, 1), outside)
    _rank(sharded, 1).symlink_to(outside)
    _refused(sharded, tmp_path / "out", "not a regular file inside")


def test_a_failed_conversion_leaves_the_previous_output_whole(models, sharded, tmp_path):
    out = tmp_path / "out"
    convert(sharded, out, progress=False)
    before = _weights(out)
    # Replicas that disagree are found while the weights stream: the write is abandoned.
    convert(models / "llama", tmp_path / "tp4", tp=4, progress=False)
    tag = tmp_path / "tp4" / "shards"
    state = torch.load(_rank(tag, 3), weights_only=True)
    state["model.layers.1.self_attn.qkv_proj.weight_k"] += 1
    torch.save(state, _rank(tag, 3))
    with pytest.raises(CheckpointError, match="copies of KV head 1"):
        convert(tag, out, progress=False)
    assert_bitwise(before, _weights(out))


def test_bad_arguments(models, sharded, tmp_path):
    with pytest.raises(ConfigurationError, match="needs tp"):
        convert(models / "llama", tmp_path / "o", progress=False)
    with pytest.raises(ConfigurationError, match="kv_layout='rows'"):
        convert(sharded, tmp_path / "o", kv_layout="rows", progress=False)
    with pytest.raises(CheckpointError, match="neither a Hugging Face checkpoint"):
        (tmp_path / "empty").mkdir()
        convert(tmp_path / "empty", tmp_path / "o", progress=False)
    with pytest.raises(ConfigurationError, match="inside\\) the source"):
        convert(models / "llama", models / "llama" / "nxd", tp=2, progress=False)
    with pytest.raises(Exception, match="tp=3"):
        convert(models / "llama", tmp_path / "o", tp=3, progress=False)


def test_cli(models, tmp_path, capsys):
    assert main(["convert", str(models / "kv1"), "--out", str(tmp_path / "nxd"), "--tp", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(huggingface) -> " in out and "tp=2" in out and "1 KV heads x 2 copies (tile)" in out
    assert main(["convert", str(tmp_path / "nxd"), "--out", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert "consolidating" in captured.err and "21 tensors" in captured.out
    assert_bitwise(_weights(models / "kv1"), _weights(tmp_path / "hf"))
    assert main(["convert", str(tmp_path / "nxd"), "--out", str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "crosschip: error: " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama", "kv1", "qwen2_bias"])
def test_reshard_at_another_tp_is_bitwise(models, tmp_path, name):
    """NxD shards at tp=4 re-sharded to 2 and back to 4 (KV replicas dropped and made again), and
    to 4 in the interleaved layout: every step consolidates to the original weights."""
    convert(models / name, tmp_path / "tp4", tp=4, progress=False)
    steps = [("tp4", "tp2", 2, None), ("tp2", "again4", 4, None), ("again4", "inter4", 4, "interleave")]
    for source, target, tp, layout in steps:
        summary = convert(tmp_path / source, tmp_path / target, tp=tp, kv_layout=layout, progress=False)
        assert summary.source_format.startswith("nxd (plain, tp=") and summary.tp == tp
        convert(tmp_path / target, tmp_path / f"{target}-hf", progress=False)
        assert_bitwise(_weights(models / name), _weights(tmp_path / f"{target}-hf"))
    files = sorted(p.name for p in (tmp_path / "tp2" / "shards" / "model").iterdir())
    assert files == ["dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_01_pp_rank_00.pt"]


def test_from_pretrained_loads_nxd_shards(models, tmp_path):
    """Trainium shards load directly (consolidated one weight at a time) on any backend."""
    import crosschip

    convert(models / "llama", tmp_path / "nxd", tp=4, progress=False)
    ids = torch.randint(0, 128, (2, 10))
    for backend in ("reference", "torch"):
        expected = crosschip.from_pretrained(models / "llama", backend=backend)
        loaded = crosschip.from_pretrained(tmp_path / "nxd", backend=backend)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected(ids).logits), backend
    (tmp_path / "nxd" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="without a config.json.*crosschip convert"):
        crosschip.from_pretrained(tmp_path / "nxd")


def test_the_example_runs(models, tmp_path, capsys):
    """examples/trainium_checkpoint.py as its docstring shows it."""
    import runpy

    argv, sys.argv = sys.argv, ["trainium_checkpoint.py", "--model", str(models / "qwen3_qknorm"), "--out",
                                str(tmp_path / "nxd"), "--tp", "2"]
    try:
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "trainium_checkpoint.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert "back bit for bit" in capsys.readouterr().out


def test_consolidation_builds_each_weight_only_when_it_is_written(models, tmp_path, monkeypatch):
    """Streaming: a weight is assembled when the writer asks for it, after the file before it was
    written (and the source keeps only the last one), so memory holds the file being written plus
    one weight. With one weight per file the events alternate: build, write, build, write."""
    from crosschip.checkpoint import SafetensorsCheckpoint, writer
    from crosschip.checkpoint.nxd.source import ConsolidatedSource

    convert(models / "qwen2_bias", tmp_path / "nxd", tp=4, progress=False)
    events = []
    get, save_file = ConsolidatedSource.get, writer.save_file

    def logged_get(self, key):
        if self._last is None or self._last[0] != key:
            events.append("build")
        return get(self, key)

    def logged_save(tensors, path, **kwargs):
        events.append("write")
        return save_file(tensors, path, **kwargs)

    monkeypatch.setattr(ConsolidatedSource, "get", logged_get)
    monkeypatch.setattr(writer, "save_file", logged_save)
    summary = convert(tmp_path / "nxd", tmp_path / "hf", progress=False, max_shard_size=1)
    assert events == ["build", "write"] * summary.tensors, events
    back = SafetensorsCheckpoint(tmp_path / "hf")
    expected = _weights(models / "qwen2_bias")
    assert sorted(back.keys()) == sorted(expected) and all(torch.equal(back.get(k), expected[k]) for k in expected)
