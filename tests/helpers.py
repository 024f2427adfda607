"""Helpers for numeric comparisons and tiny Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error relative to the largest magnitude of the expected tensor."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual - expected).abs().max() / scale).item()


def norm_rel(a, b) -> float:
    """``|a - b| / |b|`` over whole tensors, in float64 (GPU tests, whose budgets are norms)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_rel_close(actual, expected, tol: float, name: str = "tensor") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def layout_of(backend: str, component: str, spec, ctx=None):
    """The weight layout ``backend`` registered for ``component``, built for ``spec``."""
    from crosschip.plugins.descriptors import resolve_callable
    from crosschip.plugins.registry import get_registry

    return resolve_callable(get_registry().layouts[(backend, component)].transform)(spec, ctx)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    from zoo import BASE

    base = {**BASE, **overrides}
    return LlamaConfig(**base)


def save_hf_llama(path: Path, seed: int = 0, **overrides):
    """A random tiny transformers Llama saved to ``path``; returns the model in eval mode."""
    from zoo import save_hf

    return save_hf(path, tiny_llama_config(**overrides), seed)


def assert_training_parity(model, hf, ids, tol: float) -> None:
    """Forward with labels and backward on both; logits, loss and every gradient (mapped to
    Hugging Face names) agree within ``tol`` relative."""
    expected = hf(ids, labels=ids)
    expected.loss.backward()
    got = model(ids, labels=ids)
    got.loss.backward()
    assert_rel_close(got.logits, expected.logits, tol, "logits")
    assert_rel_close(got.loss, expected.loss, tol, "loss")
    grads = model.hf_grads()
    hf_grads = saved_grads(hf)
    assert set(grads) == set(hf_grads), (sorted(set(grads) ^ set(hf_grads)))
    for key, grad in hf_grads.items():
        assert_rel_close(grads[key], grad, tol, f"grad {key}")


def saved_grads(hf) -> dict[str, torch.Tensor]:
    """``hf``'s gradients under the names (and layouts) transformers writes to a checkpoint: some
    families name or stack weights differently in memory (GPT-NeoX's ``lm_head`` is saved as
    ``embed_out``; MoE experts are stacked in memory, one tensor each on disk). Written through
    ``save_pretrained`` itself, with the gradients in place of the weights."""
    import tempfile

    from safetensors.torch import load_file

    params = [p for p in hf.parameters() if p.grad is not None]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad(), tempfile.TemporaryDirectory() as directory:
        for p in params:
            p.copy_(p.grad)
        try:
            hf.save_pretrained(directory, max_shard_size="100GB")
            return load_file(Path(directory) / "model.safetensors")
        finally:
            for p, value in zip(params, saved):
                p.copy_(value)


def assert_parallel_grads_match(model, single, tol: float, where: str) -> None:
    """After a backward of both: every gradient of a parallel ``model``, gathered and mapped to
    Hugging Face names, and its total gradient norm (replicas counted once) equal ``single``'s."""
    from crosschip.training.train import clip_gradients

    grads, expected = model.hf_grads(), single.hf_grads()
    assert set(grads) == set(expected)
    for key, grad in expected.items():
        assert_rel_close(grads[key], grad, tol, f"{where} grad {key}")
    norm = clip_gradients(list(model.parameters()), float("inf"))
    assert_rel_close(norm, torch.nn.utils.clip_grad_norm_(single.parameters(), float("inf")), tol,
                     f"{where} gradient norm")


def assert_training_steps_match(model, single, ids, tol: float, where: str, steps: int = 3) -> None:
    """``steps`` AdamW steps of a parallel ``model`` and of ``single`` on the same batch: logits,
    loss, every gradient and the gradient norm agree within ``tol`` at each step.

    eps well above float32 rounding of the gradients: with the default 1e-8 Adam divides each
    gradient by its own magnitude, so an element near zero turns a rounding difference into a
    full-size step of either sign, and the two runs drift apart for reasons unrelated to TP."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-3) for m in (single, model)]
    for step in range(steps):
        expected, got = single(ids, labels=ids), model(ids, labels=ids)
        expected.loss.backward()
        got.loss.backward()
        at = f"{where} step {step}"
        assert_rel_close(got.logits, expected.logits, tol, f"{at} logits")
        assert_rel_close(got.loss, expected.loss, tol, f"{at} loss")
        assert_parallel_grads_match(model, single, tol, at)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def assert_saves_alike(model, single, directory: Path, rank: int, where: str) -> None:
    """A parallel ``model`` saved (every rank gathers, rank 0 writes) holds the same bytes, key
    by key, as ``single`` saved in one process."""
    from safetensors.torch import load_file

    ours = model.save_pretrained(directory / "parallel")
    if rank != 0:
        return
    theirs = single.save_pretrained(directory / "single")
    ours, theirs = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), f"{where}: saved {key} differs"


def train_interrupted(root: Path, name: str, stop_after: int, **args) -> dict[str, list[float]]:
    """Losses of a whole ``crosschip.training.train`` run (``{name}-full``), the same run stopped after
    ``stop_after`` steps (``{name}-half``, whose training state other runs may resume), and that
    one resumed to the end (``{name}-resumed``)."""
    from crosschip.training.train import TrainArgs, train

    def run(part: str, **extra):
        return train(TrainArgs(out=str(root / f"{name}-{part}"), **args, **extra), progress=False).losses

    return {"full": run("full"), "half": run("half", stop_after=stop_after),
            "resumed": run("resumed", resume=str(root / f"{name}-half"))}


def transplant_training_state(source: Path, target: Path) -> None:
    """Put the training state saved in checkpoint ``source`` in place of the one in ``target``
    (as a careless copy would), stamped with ``target``'s save id so that the resume checks
    after the save-id check see it (``training_state`` is a link into the committed save)."""
    import json
    import shutil

    state = (target / "training_state").resolve()
    save_id = json.loads((state / "meta.json").read_text()).get("save_id")
    shutil.rmtree(state)
    shutil.copytree((source / "training_state").resolve(), state)
    meta = json.loads((state / "meta.json").read_text())
    meta["save_id"] = save_id
    (state / "meta.json").write_text(json.dumps(meta))


#: A chat template in the shape real ones take, with {% generation %} marks so that transformers'
#: return_assistant_tokens_mask gives an independent account of the assistant tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT_SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]


def chat_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte) plus the chat specials,
    built locally with the tokenizers library; nothing downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS[3:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_chat_model(path: Path, seed: int = 0):
    """A tiny random Llama with :func:`chat_tokenizer` saved beside it in ``path``."""
    tok = chat_tokenizer()
    model = save_hf_llama(path, seed=seed, vocab_size=len(tok) + 8)
    tok.save_pretrained(path)
    return tok, model


def hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "0" * 40, ref: str | None = "main") -> Path:
    """Put the files of the model directory ``source`` into a Hugging Face hub cache at
    ``cache`` as huggingface_hub lays it out: ``models--org--name/blobs/<sha256>``,
    ``snapshots/<revision>/<file> -> ../../blobs/<sha256>`` and ``refs/<ref>`` holding the
    revision. Returns the snapshot directory."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(p for p in Path(source).iterdir() if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return snapshot


def word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level Hugging Face tokenizer of ``vocab_size`` tokens saved into ``directory``
    (built locally: nothing downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
