"""``crosschip.checkpoint.convert``: a Hugging Face checkpoint to neuronx-distributed (NxD) shards at a given
tp, or NxD shards (from NxD's trainer, Optimum Neuron or crosschip's neuron backend) to a Hugging
Face checkpoint; the source format is detected. The output is written as one atomic save (a
failure or a kill leaves whatever was at ``out`` as it was), and memory stays near one weight
(consolidating) or one rank's share (sharding) beyond what is being written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosschip.checkpoint.nxd.files import METADATA_FILE, OPTIMUM_TAG, NxdCheckpoint, is_nxd_checkpoint
from crosschip.checkpoint.nxd.source import ConsolidatedSource
from crosschip.checkpoint.nxd.metadata import KV_LAYOUTS, TILE, GQAQKV
from crosschip.checkpoint.nxd.shard import layout, rank_state
from crosschip.errors import CheckpointError, ConfigurationError

#: Files besides the weights that a model directory carries over.
COMPANIONS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
HF, NXD = "huggingface", "nxd"


@dataclass
class Summary:
    """What a conversion read and wrote."""

    source: Path
    out: Path
    source_format: str
    out_format: str
    tp: int
    tensors: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = (f"{self.source} ({self.source_format}) -> {self.out} ({self.out_format}), tp={self.tp}: "
                f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in {len(self.files)} files")
        return [head] + [f"  {n}" for n in self.notes]


def detect(path: str | Path) -> str:
    path = Path(path)
    if is_nxd_checkpoint(path):
        return NXD
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return HF
    raise CheckpointError(f"{path}: neither a Hugging Face checkpoint (model.safetensors or its index) nor a "
                          "neuronx-distributed one (a tag directory with model/, or a directory of tags, or Optimum "
                          "Neuron's shards/)")


def convert(source: str | Path, out: str | Path, *, tp: int | None = None, config: str | Path | None = None,
            kv_layout: str | None = None, fuse_qkv: bool = False, progress: bool = True,
            max_shard_size: int | str = "5GB") -> Summary:
    """Convert ``source`` into ``out`` (see the module docstring). NxD -> Hugging Face reads the
    shards' metadata, or, where there is none, ``config`` (a model directory or config.json)
    and ``kv_layout`` (``"tile"`` or ``"interleave"``, needed only for replicated KV heads).
    Hugging Face -> NxD needs ``tp``; ``kv_layout`` defaults to tile (Optimum Neuron's).
    ``max_shard_size``: of the safetensors files a consolidation writes (each is assembled in
    memory, one weight at a time)."""
    source, out = Path(source), Path(out)
    if kv_layout is not None and kv_layout not in KV_LAYOUTS:
        raise ConfigurationError(f"kv_layout={kv_layout!r}: expected one of {', '.join(KV_LAYOUTS)}")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigurationError(f"--out {out} is (inside) the source {source}; write the conversion elsewhere")
    if detect(source) == NXD:
        if tp is not None:  # re-shard: the source consolidated one weight at a time, sharded again
            return _reshard(source, out, tp, config, kv_layout or TILE, fuse_qkv, progress)
        return _consolidate(source, out, config, kv_layout, progress, max_shard_size)
    if tp is None or tp < 1:
        raise ConfigurationError(f"{source} is a Hugging Face checkpoint: converting it to NxD shards needs tp (--tp N), "
                                 f"found {tp}")
    return _shard(source, out, tp, config, kv_layout or TILE, fuse_qkv, progress)


def _load_config(where: Path):
    from transformers import AutoConfig

    directory = where.parent if where.is_file() else where
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{where}: no config.json")
    return AutoConfig.from_pretrained(directory), directory


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


# -- NxD -> Hugging Face ------------------------------------------------------------------------
def _consolidate(source: Path, out: Path, config_path, kv_layout, progress: bool, max_shard_size) -> Summary:
    from crosschip.checkpoint.writer import write_checkpoint

    ckpt = NxdCheckpoint(source)
    config_dir = Path(config_path) if config_path is not None else ckpt.config_dir
    config, companions = _load_config(config_dir) if config_dir is not None else (None, None)
    summary = Summary(source, out, f"{NXD} ({ckpt.format}, tp={ckpt.tp}, pp={ckpt.pp})", HF, ckpt.tp)
    source = ConsolidatedSource(ckpt, config, kv_layout)
    outputs, metas = list(source.outputs.values()), source.metadata
    summary.notes += _layout_notes(metas)
    bar = _bar(len(outputs), "consolidating", progress)

    def stream():
        for output in outputs:
            tensor = source.get(output.name)
            bar.update(1)
            yield output.name, tensor

    def extra(staging: Path) -> None:
        if companions is not None:
            _copy_companions(companions, staging)

    try:
        write_checkpoint(out, [(o.name, o.nbytes) for o in outputs], stream(), extra, max_shard_size)
    finally:
        bar.close()
        source.release()
    summary.tensors, summary.bytes = len(outputs), sum(o.nbytes for o in outputs)
    summary.files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if companions is None:
        summary.notes.append("no config.json found: wrote the weights only (pass --config to add one)")
    return summary


def _layout_notes(metas) -> list[str]:
    notes = [f"metadata: {m.source}" for m in metas.values()]
    gqa = [s for m in metas.values() for s in m.specs if isinstance(s, GQAQKV)]
    if gqa:
        s = gqa[0]
        notes.append(f"attention: {len(gqa)} GQA QKV layers, {s.kv_heads} KV heads x {s.copies} copies"
                     + (f" ({s.kv_layout})" if s.copies > 1 else "") + (", fused weight_qkv" if s.fused else ""))
    return notes


def _copy_companions(directory: Path, staging: Path) -> None:
    for name in COMPANIONS:
        path = directory / name
        if path.is_file():
            shutil.copyfile(path, staging / name)


# -- Hugging Face -> NxD ------------------------------------------------------------------------
def _shard(source: Path, out: Path, tp: int, config_path, kv_layout: str, fuse_qkv: bool, progress: bool) -> Summary:
    from crosschip.checkpoint.reader import SafetensorsCheckpoint

    config, companions = _load_config(Path(config_path) if config_path is not None else source)
    return _write_shards(source, SafetensorsCheckpoint(source), HF, config, companions, out, tp, kv_layout, fuse_qkv,
                         progress)


def _reshard(source: Path, out: Path, tp: int, config_path, kv_layout: str, fuse_qkv: bool, progress: bool) -> Summary:
    """NxD shards at another tp. The source is read by its metadata (or, without it, the config
    and no KV replicas: replicated shards without metadata are consolidated first, naming their
    layout); ``kv_layout`` is the output's."""
    ckpt = NxdCheckpoint(source)
    config_dir = Path(config_path) if config_path is not None else ckpt.config_dir
    if config_dir is None:
        raise CheckpointError(f"{ckpt.tag_dir}: no config.json beside the shards: name the model config (--config DIR)")
    config, companions = _load_config(config_dir)
    reader = ConsolidatedSource(ckpt, config)
    return _write_shards(source, reader, f"{NXD} ({ckpt.format}, tp={ckpt.tp})", config, companions, out, tp,
                         kv_layout, fuse_qkv, progress)


def _write_shards(source: Path, reader, source_format: str, config, companions: Path, out: Path, tp: int,
                  kv_layout: str, fuse_qkv: bool, progress: bool) -> Summary:
    """``reader``'s canonical tensors (``keys``, ``shape``, ``get``, ``get_slice``) as NxD rank
    files at ``tp``, in Optimum Neuron's layout, one rank at a time, as one atomic save."""
    from crosschip.checkpoint.transaction import atomic_save

    names = reader.keys()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    meta, physical = layout(config, names, tp, kv_layout, fuse_qkv)
    # A tied LM head is saved by NxD as its own key (state_dict keeps both names), but it is the
    # embedding, and not in the metadata (Optimum lists named_parameters, which are deduplicated).
    tied_head = tied and "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    summary = Summary(source, out, source_format, f"{NXD} (plain)", tp)
    summary.notes += _layout_notes({0: meta})
    bar = _bar(tp, "sharding", progress)
    try:
        with atomic_save(out) as staging:
            tag = staging / OPTIMUM_TAG
            (tag / "model").mkdir(parents=True)
            for rank in range(tp):
                state = rank_state(reader, meta, physical, tp, rank)
                if tied_head:
                    state["lm_head.weight"] = state["model.embed_tokens.weight"]
                summary.tensors += len(state)
                summary.bytes += sum(t.numel() * t.element_size() for t in state.values())
                # Each tensor owns its storage: torch.save writes whole storages, not views.
                torch.save({k: t.contiguous().clone() for k, t in state.items()},
                           tag / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_00.pt")
                del state
                bar.update(1)
            (tag / METADATA_FILE.format(pp=0)).write_text(json.dumps(meta.to_json(), indent=4))
            (tag / "checkpoint").write_text("1")
            (tag / "done").write_text("1")
            _copy_companions(companions, staging)
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    finally:
        bar.close()
        reader.release()
    summary.files = files
    return summary
