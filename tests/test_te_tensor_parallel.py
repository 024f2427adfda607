"""Tensor parallelism of the te backend (Transformer Engine's own TP groups, NCCL, two GPUs), with
and without sequence parallelism, equals the single-process te model: float32 logits, loss, every gradient under Hugging Face names
and a few AdamW steps; the saved checkpoint bitwise; each rank reads only its share of the
checkpoint. bf16 (TE's fused attention over this rank's heads) within a budget derived from the
single model's own bf16 error, and an FP8 step. One launch runs several checks: starting the
processes dominates the cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import crosschip
from crosschip.errors import ConfigurationError
from gloo_spawn import spawn
from helpers import assert_saves_alike, norm_rel, train_interrupted

pytestmark = [pytest.mark.cuda, pytest.mark.multigpu, pytest.mark.usefixtures("te_installed")]
# TE runs float32 GEMMs on TF32 tensor cores (unit roundoff 2**-11) whatever torch's TF32 flags
# say, and TP splits the row-parallel GEMMs' sums over the ranks: a few TF32 roundings apart.
TOL = 4 * 2**-11
GRAD_TOL = 8 * 2**-11


def _config(kind: str, **extra):
    import transformers

    kwargs = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(extra)
    return getattr(transformers, kind)(**kwargs)


def _save_models(root: Path) -> None:
    """Llama (tied embeddings), Qwen2 (QKV bias), Qwen3 (q/k norms over each head: partial
    gradients under TP); 8 query heads and 2 KV heads, so tp=2 gives each rank one KV group.
    kv1: one KV head, which tp=2 replicates (each rank holds a copy with its 4 query heads)."""
    from zoo import save_hf

    save_hf(root / "llama", _config("LlamaConfig", tie_word_embeddings=True))
    save_hf(root / "qwen2", _config("Qwen2Config"))
    save_hf(root / "qwen3", _config("Qwen3Config", head_dim=32))
    save_hf(root / "kv1", _config("LlamaConfig", num_key_value_heads=1))


def _spawn(root: Path, body, *args) -> None:
    spawn(2, root, body, *args, backend="nccl")


def _report(root: Path, rank: int, **numbers) -> None:
    """Measured errors, printed (``pytest -s``) and kept beside the checkpoints."""
    if rank == 0:
        line = json.dumps(numbers)
        print("te-tp:", line, flush=True)
        with open(root / "measured.jsonl", "a") as f:
            f.write(line + "\n")


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.float(), out.loss.float(), model.hf_grads()


def _check_fp32(root: Path, name: str, rank: int, sp: bool = False) -> None:
    """tp=2 (with ``sp``: sequence parallel too) against one process, in float32."""
    import torch.distributed as dist

    from crosschip.training.train import clip_gradients

    path = root / name
    single = crosschip.from_pretrained(path, backend="te", device="cuda", strict=True).train()
    model = crosschip.from_pretrained(path, backend="te", device="cuda", tp=2, sequence_parallel=sp,
                                      strict=True).train()
    for component in ("qkv_projection", "out_projection", "gated_mlp"):
        assert model.runtime.report.backends_for(component) == {"te"}, component
    qkv, whole = model.model.layers[0].self_attn.qkv_proj.proj, single.model.layers[0].self_attn.qkv_proj.proj
    config = single.config
    # Each rank: its query heads and one KV head per group it serves (a replica where tp > KV heads).
    local_kv = max(config.num_key_value_heads // 2, 1)
    head_dim = whole.weight.shape[0] // (config.num_attention_heads + 2 * config.num_key_value_heads)
    assert qkv.tp_size == 2 and qkv.parallel_mode == "column"
    assert qkv.weight.shape[0] == (config.num_attention_heads // 2 + 2 * local_kv) * head_dim
    assert model.runtime.device_mesh.size() == 2
    # Streaming sharded load: this rank read exactly the bytes it holds (replicated ones whole).
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.checkpoint_bytes_read == held < single.checkpoint_bytes_read, (model.checkpoint_bytes_read, held)

    # Saving only gathers the shards: the same bytes as the single-process model's save.
    assert_saves_alike(model, single, root / f"{name}-tp2{'-sp' if sp else ''}", rank, name)

    torch.manual_seed(1)
    ids = torch.randint(1, 256, (2, 64)).cuda()
    # eps well above float32 rounding of the gradients (see tests/test_tensor_parallel.py).
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-3) for m in (single, model)]
    worst = {"logits": 0.0, "loss": 0.0, "grad": 0.0}
    for step in range(3):
        expected, got = _step(single, ids), _step(model, ids)
        where = f"{name} sp={sp} step {step}"
        worst["logits"] = max(worst["logits"], norm_rel(got[0], expected[0]))
        worst["loss"] = max(worst["loss"], norm_rel(got[1], expected[1]))
        assert norm_rel(got[0], expected[0]) < TOL, f"{where} logits"
        assert norm_rel(got[1], expected[1]) < TOL, f"{where} loss"
        assert set(got[2]) == set(expected[2])
        for key, grad in expected[2].items():
            err = norm_rel(got[2][key], grad)
            worst["grad"] = max(worst["grad"], err)
            assert err < GRAD_TOL, f"{where} grad {key}: {err:.3g}"
        # The clipping norm over the shards (a replicated KV head counted once) is the whole one.
        norms = [clip_gradients(m.parameters(), float("inf")) for m in (single, model)]
        worst["grad_norm"] = max(worst.get("grad_norm", 0.0), norm_rel(norms[1], norms[0]))
        assert worst["grad_norm"] < TOL, f"{where} gradient norm {norms}"  # measured <= 8.4e-5
        for optimizer in optimizers:
            optimizer.step()
    # Replicated weights stay identical on every rank (their gradients agree exactly).
    norm = model.model.layers[0].mlp.mlp.layer_norm_weight.detach()
    copies = [torch.empty_like(norm) for _ in range(2)]
    dist.all_gather(copies, norm)
    assert torch.equal(copies[0], copies[1])
    if sp:  # decode steps have one position, which tp=2 cannot split
        with pytest.raises(ConfigurationError, match=r"tp=2 does not divide the sequence length \(5\)"):
            model.generate(ids[:, :5], max_new_tokens=1)
    _report(root, rank, check="fp32-sp" if sp else "fp32", model=name, **worst)


def _check_bf16_and_fp8(root: Path, rank: int) -> None:
    """TE's fused attention runs over this rank's heads (bf16). The tp=2 model's error against
    the float32 single model stays within twice the single bf16 model's own error (+ one bf16
    ulp of headroom). FP8 (delayed scaling, amaxes reduced over the TP group) trains a step."""
    path, ids = root / "qwen2", _ids()
    ref = _step(crosschip.from_pretrained(path, backend="te", device="cuda").train(), ids)
    single = _step(crosschip.from_pretrained(path, backend="te", device="cuda", dtype="bf16").train(), ids)
    model = crosschip.from_pretrained(path, backend="te", device="cuda", dtype="bf16", tp=2, strict=True).train()
    assert model.runtime.report.backends_for("attention") == {"te"}
    got = _step(model, ids)
    numbers = {}
    for what, i in (("logits", 0), ("loss", 1)):
        numbers[what] = (norm_rel(got[i], ref[i]), norm_rel(single[i], ref[i]))
        assert numbers[what][0] <= 2 * numbers[what][1] + 4e-3, what
    for key, g32 in ref[2].items():
        budget = 2 * norm_rel(single[2][key], g32) + 4e-3
        assert norm_rel(got[2][key], g32) <= budget, key
    fp8 = crosschip.from_pretrained(path, backend="te", device="cuda", dtype="bf16", tp=2,
                                    precision="fp8", fp8_recipe="delayed").train()
    losses = []
    optimizer = torch.optim.AdamW(fp8.parameters(), lr=1e-4)
    for _ in range(2):
        _, loss, grads = _step(fp8, ids)
        assert all(torch.isfinite(g).all() for g in grads.values())
        losses.append(loss.item())
        optimizer.step()
    numbers["fp8_loss_vs_bf16"] = abs(losses[0] - got[1].item()) / got[1].item()
    assert numbers["fp8_loss_vs_bf16"] < 1e-2  # measured 5.9e-4
    _report(root, rank, check="bf16+fp8", model="qwen2", **numbers)


def _ids():
    torch.manual_seed(2)
    return torch.randint(1, 256, (2, 64)).cuda()


def _check_errors(root: Path) -> None:
    with pytest.raises(ConfigurationError, match="gated_mlp at model.layers.0.mlp was built by backend 'torch'"):
        crosschip.from_pretrained(root / "llama", backend="te", components={"gated_mlp": "torch"},
                                  device="cuda", tp=2)


TRAIN = dict(model="tiny-llama", backend="te", device="cuda", steps=6, batch_size=4, seq_len=64, lr=3e-3, seed=5)


def _check_training(root: Path, rank: int) -> None:
    """`crosschip train --backend te --tp 2`, whole and interrupted + resumed (gradient clipping
    over the shards, optimizer state through torch.distributed.checkpoint)."""
    losses = train_interrupted(root, "train", 3, tp=2, **TRAIN)
    if rank == 0:
        (root / "train-losses.json").write_text(json.dumps(losses))


def _run(rank: int, world: int, root: Path, cases) -> None:
    for case in cases:
        if case == "train":
            _check_training(root, rank)
        elif case == "errors":
            _check_errors(root)
        elif case == "bf16":
            _check_bf16_and_fp8(root, rank)
        elif case.endswith("-sp"):
            _check_fp32(root, case[:-len("-sp")], rank, sp=True)
        else:
            _check_fp32(root, case, rank)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("te-tp")
    _save_models(root)
    return root


def test_te_tp2_matches_single_process(checkpoints):
    _spawn(checkpoints, _run, ["llama", "qwen2", "qwen3", "llama-sp", "qwen3-sp", "kv1", "kv1-sp", "errors"])


def test_te_tp2_bf16_attention_and_fp8(checkpoints):
    _spawn(checkpoints, _run, ["bf16"])


def test_te_tp2_training_matches_and_resumes(checkpoints):
    from crosschip.training.train import TrainArgs, train

    single = train(TrainArgs(out=str(checkpoints / "train-single"), **TRAIN), progress=False)
    _spawn(checkpoints, _run, ["train"])
    losses = json.loads((checkpoints / "train-losses.json").read_text())
    print("te-tp:", json.dumps({"check": "train", "single": single.losses, **losses}), flush=True)
    assert len(losses["full"]) == len(losses["resumed"]) == len(single.losses) == TRAIN["steps"]
    assert losses["half"] == losses["full"][:3]
    # Six steps of TF32 roundings apart (measured <= 2.1e-5 relative).
    for a, b in zip(losses["full"], single.losses):
        assert abs(a - b) <= 2e-4 * abs(b), (losses["full"], single.losses)
    # The same computation replayed: only a lost or misplaced optimizer state would move it.
    for a, b in zip(losses["resumed"], losses["full"]):
        assert abs(a - b) <= 1e-5 * abs(b), (losses["resumed"], losses["full"])
    with pytest.raises(ConfigurationError, match=r"training state holds the weights of .*te:gated_mlp.* in another physical layout"):
        train(TrainArgs(out=str(checkpoints / "never"), resume=str(checkpoints / "train-half"), **TRAIN),
              progress=False)
