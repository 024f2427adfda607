"""Adding, loading, saving and merging a model's adapter (the methods of
:class:`crosschip.CausalLM` call these)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from crosschip import weights
from crosschip.errors import CheckpointError, ConfigurationError
from crosschip.lora import sites
from crosschip.lora.config import LoraConfig
from crosschip.lora.slots import LoraAdapter, LoraSlot
from crosschip.checkpoint.sharded_load import column_sources, local_region, row_sources

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _targets(model) -> dict[str, list[tuple]]:
    """Projection name -> ``(binding, hf_key)`` of every weight an adapter could target."""
    found: dict[str, list[tuple]] = {}
    for b in weights.bindings(model):
        if b.info.component == "embedding":
            continue
        for key, shape in b.hf_shapes.items():
            parts = key.split(".")
            if len(shape) == 2 and parts[-1] == "weight" and len(parts) >= 2:
                found.setdefault(parts[-2], []).append((b, key))
    return found


def attach(model, config: LoraConfig) -> LoraAdapter:
    """A new adapter on ``model`` (PEFT's initialisation), its base weights frozen."""
    if getattr(model, "lora_adapter", None) is not None:
        raise ConfigurationError("the model already carries an adapter; merge it (merge_adapter) or "
                                 "remove it (remove_adapter) before adding another")
    available = _targets(model)
    missing = [t for t in config.target_modules if t not in available]
    if missing:
        raise ConfigurationError(f"LoraConfig.target_modules: the model has no {missing[0]!r} projection "
                                 f"(it has {', '.join(sorted(available))})")
    adapter = LoraAdapter(config)
    per_module: dict[int, tuple] = {}
    for target in config.target_modules:
        for b, key in available[target]:
            entries = _entries(model, b, key, target, config, adapter)
            per_module.setdefault(id(b.module), (b.module, []))[1].extend(entries)
    for param in model.parameters():
        param.requires_grad_(False)
    model.lora_adapter = adapter
    _replicate(model, adapter)
    for module, entries in per_module.values():
        sites.install(module, entries)
    return adapter


def _replicate(model, adapter: LoraAdapter) -> None:
    """The adapter is whole on every rank, initialised alike. Under data parallelism (the
    adapter, a small fraction of the weights, is added after FSDP2 sharded the base) its
    gradients are averaged over the ``dp`` ranks as they arrive, as FSDP2 averages the base's."""
    runtime = model.runtime
    if runtime.parallel.size == 1 or not model._parallel():
        return
    import torch.distributed as dist

    for param in adapter.parameters():  # one initialisation on every rank
        dist.broadcast(param.data, src=0)
    if runtime.parallel.dp == 1:
        return
    group = runtime.device_mesh.get_group("dp")
    size = runtime.parallel.dp

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad / size

    for param in adapter.parameters():
        param.register_hook(hook)


def _entries(model, b, key: str, target: str, config: LoraConfig, adapter: LoraAdapter) -> list:
    where = f"{b.info.component} ({target}) at {b.path}, built by backend {b.info.backend!r}"
    ids, columns = _sources(b)
    supported = getattr(b.module, "lora_sites", ())
    kid = list(b.hf_shapes).index(key)
    holding = {name: t for name, t in (ids or {}).items() if ((t >> 32) == kid).any()}
    refused = [name for name in holding if name not in supported]
    if ids is None or not holding or refused:
        reason = getattr(b.module, "lora_decline", None) or (
            f"its module {type(b.module).__name__} applies no adapter to "
            f"{', '.join(refused or ['the weight'])}")
        raise ConfigurationError(f"LoRA on {where}: the backend cannot carry an adapter here: {reason}")
    out_features, in_features = b.hf_shapes[key]
    first = b.module.get_parameter(next(iter(holding)))
    # As PEFT (autocast_adapter_dtype): a 16-bit base gets float32 adapters, which train
    # without losing small updates to 16-bit rounding and cost little (r is small).
    dtype = torch.float32 if first.dtype in (torch.bfloat16, torch.float16) else first.dtype
    slot = LoraSlot(key.removesuffix(".weight"), out_features, in_features, config,
                    device=first.device, dtype=dtype)
    if config.use_dora:
        with torch.no_grad():
            base = b.to_hf(weights._physical(b, grads=False))[key]
            slot.magnitude.copy_(torch.linalg.norm(base.to(slot.magnitude.device), dim=1))
    adapter.add(slot)
    entries = [_entry(b, slot, name, flat, kid, where, (columns or {}).get(name)) for name, flat in holding.items()]
    parallel = model.runtime.parallel
    for e in entries:
        if e.group is not None and b.info.component == "lm_head":
            raise ConfigurationError(f"LoRA on {where}: not supported yet at tp={parallel.tp} (the vocab-parallel "
                                     "LM head)")
    return entries


def _sources(b):
    """``(row ids, column ids)`` per physical weight: rows as :func:`row_sources` gives them, or
    (for a layout that permutes a matrix's columns and leaves its rows, as the neuron backend's
    ``o_proj`` follows its query heads) every row in order and the column ids."""
    rows = row_sources(b)
    if rows is not None:
        return rows, None
    columns = column_sources(b)
    if columns is None or not all(by_column for _, by_column in columns.values()):
        return None, None
    keys = list(b.hf_shapes)
    rows, cols = {}, {}
    for name, (ids, _) in columns.items():
        kid = int(ids[0] >> 32)
        if ((ids >> 32) != kid).any():
            return None, None  # columns of several keys side by side
        rows[name] = torch.arange(b.hf_shapes[keys[kid]][0], dtype=torch.int64) + (kid << 32)
        cols[name] = ids & ((1 << 32) - 1)
    return rows, cols


def _entry(b, slot, name: str, flat: torch.Tensor, kid: int, where: str, columns=None) -> sites.Entry:
    param = b.module.get_parameter(name)
    region, group, param_columns = _tp_region(param, where)
    (r0, r1), (c0, c1) = region[0], region[1]
    local = flat[r0:r1]
    mine = (local >> 32) == kid
    positions = mine.nonzero().reshape(-1)
    rows = local[mine] & ((1 << 32) - 1)
    if positions.numel() == local.numel() and torch.equal(rows, torch.arange(slot.lora_B.shape[0])):
        positions = rows = None  # the whole output, in order
    if columns is not None:  # permuted: the Hugging Face columns this rank's physical ones hold
        cols = columns[c0:c1]
        cols = None if torch.equal(cols, torch.arange(param_columns)) else cols
    else:
        cols = None if (c0, c1) == (0, param_columns) else torch.arange(c0, c1)
    # The bias beside the weight: "proj.weight" -> "proj.bias", NxD's "weight_qkv" -> "bias_qkv".
    head, _, leaf = name.rpartition(".")
    bias = (f"{head}." if head else "") + leaf.replace("weight", "bias", 1)
    has_bias = bias in dict(b.module.named_parameters())
    return sites.Entry(slot, name, bias if has_bias else None, positions, rows, cols, group)


def _tp_region(param, where: str):
    """This rank's ``((row_start, row_stop), (col_start, col_stop))`` of a weight sharded over
    the tensor-parallel mesh, that mesh's process group (None when not sharded) and the
    weight's global number of columns. A DTensor parameter (torch backend) says where it is; a
    library's layer holding a plain local shard (neuronx-distributed's, see
    :mod:`crosschip.parallel.local_shards`) is seen through its declared DTensor view. A weight that FSDP2
    shards over ``dp`` only is whole at compute time."""
    from crosschip.parallel.local_shards import as_global

    shard = getattr(param, "crosschip_local_shard", None)
    view = as_global(param.detach(), *shard) if shard is not None else param
    mesh = getattr(view, "device_mesh", None)
    if mesh is None or "tp" not in (mesh.mesh_dim_names or ()):
        return ((0, param.shape[0]), (0, param.shape[1])), None, param.shape[1]
    if mesh.ndim > 1:  # ("dp", "tp"): FSDP2 gathers the dp shards before compute; the tp part remains
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        tp = mesh.mesh_dim_names.index("tp")
        sub = mesh["tp"]
        shape, offset = compute_local_shape_and_global_offset(view.shape, sub, (view.placements[tp],))
        return tuple((o, o + n) for o, n in zip(offset, shape)), sub.get_group(), view.shape[1]
    return local_region(view), mesh.get_group(), view.shape[1]


# -- PEFT files ------------------------------------------------------------------------------
def save(model, directory, base_model: str | None = None) -> Path:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT writes them, as one
    atomic save. Under a process group every rank calls this; rank 0 writes."""
    from crosschip.checkpoint.transaction import atomic_save

    _require(model)
    with atomic_save(directory, distributed=model._parallel()) as staging:
        write(model, staging, base_model)
    return Path(directory)


def write(model, staging: Path, base_model: str | None = None) -> None:
    """The adapter's files into ``staging`` (rank 0 writes; every rank gathers)."""
    from safetensors.torch import save_file

    from crosschip.parallel.distributed import rank

    adapter = _require(model)
    tensors = {k: weights.whole(v).detach().to("cpu").contiguous().clone()
               for slot in adapter.slots.values() for k, v in slot.peft_tensors().items()}
    if rank() == 0:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        text = json.dumps(adapter.config.to_peft(base_model), indent=2, sort_keys=True)
        (staging / CONFIG_FILE).write_text(text + "\n")


def load(model, directory) -> LoraAdapter:
    """Attach the PEFT adapter in ``directory``: every key checked (names and shapes) before
    any is used; on any mismatch the model is left without an adapter and as it was."""
    from safetensors import safe_open

    directory = Path(directory)
    config = LoraConfig.read(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (PEFT adapters in {WEIGHTS_FILE} only; adapter_model.bin "
                              "is a pickle and is never read)")
    grad_flags = [p.requires_grad for p in model.parameters()]
    adapter = attach(model, config)
    try:
        expected = {k: v for slot in adapter.slots.values() for k, v in slot.peft_tensors().items()}
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
        with handle:
            problems = []
            stored = set(handle.keys())
            for key, param in expected.items():
                if key not in stored:
                    problems.append(f"missing key {key!r} (expected shape {list(param.shape)})")
                    continue
                piece = handle.get_slice(key)
                shape, dtype = list(piece.get_shape()), piece.get_dtype()
                if shape != list(param.shape):
                    problems.append(f"key {key!r} has shape {shape}, expected {list(param.shape)} "
                                    "(an adapter for another base model?)")
                elif not dtype.startswith(("F", "BF")):
                    problems.append(f"key {key!r} has dtype {dtype}, expected a floating-point dtype")
            # PEFT saves the base LM head beside an adapter on it ("save_embedding_layers"): it
            # must be this model's, or the adapter was trained on another (or resized) base.
            copies = {k for k in stored - set(expected) if k.endswith(".base_layer.weight")
                      and k.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
                      in adapter.by_prefix()}
            problems += [f"unexpected key {k!r}" for k in sorted(stored - set(expected) - copies)]
            problems += _base_copies_differ(model, handle, copies)
            if problems:
                raise CheckpointError(f"{path} does not match the model and {CONFIG_FILE}:\n  "
                                      + "\n  ".join(problems))
            with torch.no_grad():
                for key, param in expected.items():
                    param.copy_(handle.get_tensor(key).to(param.dtype))
    except BaseException:
        remove(model, grad_flags)
        raise
    return adapter


def _base_copies_differ(model, handle, keys) -> list[str]:
    if not keys:
        return []
    base = weights.canonical_state_dict(model)
    problems = []
    for key in sorted(keys):
        name = key.removeprefix("base_model.model.").replace(".base_layer.weight", ".weight")
        stored = handle.get_tensor(key)
        if name not in base or stored.shape != base[name].shape or not torch.equal(
                stored.to(base[name].dtype), base[name].cpu()):
            problems.append(f"key {key!r} (the base weight the adapter was trained on) differs from the "
                            f"model's {name!r}: an adapter for another base model")
    return problems


def remove(model, grad_flags=None) -> None:
    """Take the adapter off (its updates are lost), base weights trainable again (or as
    ``grad_flags`` says)."""
    _require(model)
    for module in model.modules():
        sites.remove(module)
    del model.lora_adapter
    flags = grad_flags if grad_flags is not None else [True] * len(list(model.parameters()))
    for param, flag in zip(model.parameters(), flags):
        param.requires_grad_(flag)


@torch.no_grad()
def merge(model) -> None:
    """Fold the adapter into the base weights as PEFT's ``merge_and_unload`` does (LoRA:
    ``W + (B @ A) * scale``; DoRA: ``m / |W + (B @ A) * scale| * (W + (B @ A) * scale)``), then
    take it off: the model is a plain one whose ``save_pretrained`` transformers loads."""
    adapter = _require(model)
    slots = adapter.by_prefix()
    for b in weights.bindings(model):
        mine = {key: slots[key.removesuffix(".weight")] for key in b.hf_shapes
                if key.removesuffix(".weight") in slots}
        if not mine:
            continue
        canonical = b.to_hf(weights._physical(b, grads=False))
        for key, slot in mine.items():
            # In the adapter's dtype (float32 over a 16-bit base), rounded once to the base's.
            base = canonical[key]
            a, bb = (weights.whole(t).to(base.device) for t in (slot.lora_A, slot.lora_B))
            delta = (bb @ a) * slot.scaling
            w = base.to(delta.dtype)
            if slot.magnitude is None:
                canonical[key] = (w + delta).to(base.dtype)
            else:
                norm = torch.linalg.norm(w + delta, dim=1).to(w.dtype)
                m = weights.whole(slot.magnitude).to(base.device, w.dtype)
                canonical[key] = ((m / norm).view(-1, 1) * (w + delta)).to(base.dtype)
        weights._load_physical(b, b.from_hf(canonical))
    remove(model)


def _require(model) -> LoraAdapter:
    adapter = getattr(model, "lora_adapter", None)
    if adapter is None:
        raise ConfigurationError("the model carries no adapter (add one with add_adapter or "
                                 "from_pretrained(..., lora=LoraConfig(...)), or load one with load_adapter)")
    return adapter
