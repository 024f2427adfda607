"""Optimum Neuron's consolidation metadata (``mp_metadata_pp_rank_<pp>.json``), parsed strictly,
or derived from a Hugging Face config and the parameter names of the shards.

The file holds ``parameters`` (per parameter name: ``tensor_model_parallel`` and, when true,
``partition_dim``, ``partition_stride``, ``num_partitions``) and
``model_weight_transformation_specs``: per module, ``[class name, fields]`` pairs of Optimum's
``FusedLinearsSpec`` (several Hugging Face linears fused into one column-parallel linear: gate_up,
or q/k/v with stride 3) and ``GQAQKVColumnParallelLinearSpec`` (NxD's GQA QKV layer, with
``kv_size_multiplier`` copies of each KV head and the query / o_proj permutation that goes with
them). Only these two are known; any other class, or a LoRA spec, is refused by name.

KV replicas. Optimum (and NxD on trn1) tile them: the KV weight repeated ``kv_size_multiplier``
times, then cut into tp row blocks, queries permuted to follow. crosschip's neuron backend on trn2
follows NxD's trn2 grouping, where a head's copies are adjacent and queries stay in order; it marks
such a spec with the extra field ``"kv_layout": "interleave"``, which Optimum's reader does not
know and refuses (it would otherwise consolidate those weights wrongly).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from crosschip.errors import CheckpointError

TILE, INTERLEAVE = "tile", "interleave"
KV_LAYOUTS = (TILE, INTERLEAVE)


@dataclass(frozen=True)
class Partition:
    """How one parameter is split over tp ranks (``dim`` None: replicated)."""

    dim: int | None = None
    stride: int = 1
    partitions: int = 1

    def to_json(self) -> dict:
        if self.dim is None:
            return {"tensor_model_parallel": False}
        return {"tensor_model_parallel": True, "partition_dim": self.dim, "partition_stride": self.stride,
                "num_partitions": self.partitions}


@dataclass(frozen=True)
class FusedLinears:
    """``module.fused`` holds ``linears`` concatenated (per rank) along ``axis``."""

    module: str
    fused: str
    linears: tuple[str, ...]
    bias: bool
    axis: int
    dims: tuple[int, ...]
    tp: int

    def to_json(self) -> list:
        return ["FusedLinearsSpec", {"fused_linear_name": self.fused, "linear_names": list(self.linears),
                                     "bias": self.bias, "fuse_axis": self.axis, "original_dims": list(self.dims),
                                     "tp_size": self.tp, "peft_type": None}]


@dataclass(frozen=True)
class GQAQKV:
    """NxD's ``GQAQKVColumnParallelLinear`` at ``module.qkv`` (``weight_qkv`` fused, or
    ``weight_q/k/v``), and the ``o_proj`` whose input columns follow its query order."""

    module: str
    qkv: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    copies: int
    q_rows: int  # per rank
    kv_rows: int  # per rank
    fused: bool
    bias: bool
    tp: int
    kv_layout: str = TILE

    @property
    def head_dim(self) -> int:
        return self.q_rows * self.tp // self.heads

    def to_json(self) -> list:
        fields = {"gqa_qkv_projection_name": self.qkv, "query_projection_name": self.q,
                  "key_projection_name": self.k, "value_projection_name": self.v,
                  "output_projection_name": self.o, "num_attention_heads": self.heads,
                  "num_key_value_heads": self.kv_heads, "kv_size_multiplier": self.copies,
                  "q_output_size_per_partition": self.q_rows, "kv_output_size_per_partition": self.kv_rows,
                  "fuse_qkv": self.fused, "bias": self.bias, "tp_size": self.tp, "peft_type": None}
        if self.kv_layout != TILE:
            fields["kv_layout"] = self.kv_layout
        return ["GQAQKVColumnParallelLinearSpec", fields]


@dataclass
class Metadata:
    parameters: dict[str, Partition] = field(default_factory=dict)
    specs: list = field(default_factory=list)
    source: str = "metadata"

    def to_json(self) -> dict:
        by_module: dict[str, list] = {}
        for spec in self.specs:
            by_module.setdefault(spec.module, []).append(spec.to_json())
        return {"parameters": {name: p.to_json() for name, p in self.parameters.items()},
                "model_weight_transformation_specs": [
                    {"module_fully_qualified_name": m, "specs": s} for m, s in by_module.items()]}


# -- reading ------------------------------------------------------------------------------------
def read(path: Path) -> Metadata:
    try:
        data = json.loads(path.read_text(), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None
    where = str(path)
    _expect(data, dict, where, "the file")
    unknown = set(data) - {"parameters", "model_weight_transformation_specs"}
    if unknown or "parameters" not in data:
        raise CheckpointError(f"{where}: expected the keys 'parameters' and 'model_weight_transformation_specs', "
                              f"found {sorted(data)}")
    meta = Metadata(source=where)
    _expect(data["parameters"], dict, where, "'parameters'")
    for name, entry in data["parameters"].items():
        meta.parameters[name] = _partition(entry, f"{where}: parameter {name!r}")
    specs = data.get("model_weight_transformation_specs", [])
    _expect(specs, list, where, "'model_weight_transformation_specs'")
    for i, module_specs in enumerate(specs):
        here = f"{where}: model_weight_transformation_specs[{i}]"
        _expect(module_specs, dict, here, "the entry")
        module = module_specs.get("module_fully_qualified_name")
        _expect(module, str, here, "'module_fully_qualified_name'")
        _expect(module_specs.get("specs"), list, here, "'specs'")
        for pair in module_specs["specs"]:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], dict)):
                raise CheckpointError(f"{here} ({module}): expected [class name, fields] pairs, found {pair!r}")
            meta.specs.append(_spec(module, pair[0], dict(pair[1]), f"{here} ({module})"))
    return meta


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _expect(value, kind, where: str, what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{where}: {what} must be a {kind.__name__}, found {value!r}")


def _partition(entry, where: str) -> Partition:
    _expect(entry, dict, where, "the entry")
    parallel = entry.get("tensor_model_parallel")
    _expect(parallel, bool, where, "'tensor_model_parallel'")
    if not parallel:
        return Partition()
    values = {}
    for key in ("partition_dim", "partition_stride", "num_partitions"):
        _expect(entry.get(key), int, where, repr(key))
        values[key] = entry[key]
    if values["partition_dim"] not in (0, 1) or values["partition_stride"] < 1 or values["num_partitions"] < 1:
        raise CheckpointError(f"{where}: expected partition_dim 0 or 1 and positive stride and partitions, "
                              f"found {values}")
    return Partition(values["partition_dim"], values["partition_stride"], values["num_partitions"])


_FUSED = {"fused_linear_name": str, "linear_names": list, "bias": bool, "fuse_axis": (int, str),
          "original_dims": list, "tp_size": int}
_GQA = {"gqa_qkv_projection_name": str, "query_projection_name": str, "key_projection_name": str,
        "value_projection_name": str, "output_projection_name": str, "num_attention_heads": int,
        "num_key_value_heads": int, "kv_size_multiplier": int, "q_output_size_per_partition": int,
        "kv_output_size_per_partition": int, "fuse_qkv": bool, "bias": bool, "tp_size": int}


def _spec(module: str, name: str, fields: dict, where: str):
    peft = fields.pop("peft_type", None)
    if peft is not None:
        raise CheckpointError(f"{where}: a {name} for a PEFT ({peft}) adapter; crosschip consolidates model "
                              "weights only (adapter shards are not supported yet)")
    if name == "FusedLinearsSpec":
        _fields(fields, _FUSED, where, name)
        axis = {"column": 0, "row": 1}.get(fields["fuse_axis"], fields["fuse_axis"])
        if axis not in (0, 1) or not all(isinstance(d, int) for d in fields["original_dims"]) or \
                not all(isinstance(n, str) for n in fields["linear_names"]):
            raise CheckpointError(f"{where}: {name} has fuse_axis {fields['fuse_axis']!r}, original_dims "
                                  f"{fields['original_dims']!r}, linear_names {fields['linear_names']!r}")
        return FusedLinears(module, fields["fused_linear_name"], tuple(fields["linear_names"]), fields["bias"],
                            axis, tuple(fields["original_dims"]), fields["tp_size"])
    if name == "GQAQKVColumnParallelLinearSpec":
        layout = fields.pop("kv_layout", TILE)
        if layout not in KV_LAYOUTS:
            raise CheckpointError(f"{where}: kv_layout {layout!r}; expected one of {', '.join(KV_LAYOUTS)}")
        _fields(fields, _GQA, where, name)
        f = fields
        spec = GQAQKV(module, f["gqa_qkv_projection_name"], f["query_projection_name"], f["key_projection_name"],
                      f["value_projection_name"], f["output_projection_name"], f["num_attention_heads"],
                      f["num_key_value_heads"], f["kv_size_multiplier"], f["q_output_size_per_partition"],
                      f["kv_output_size_per_partition"], f["fuse_qkv"], f["bias"], f["tp_size"], layout)
        check_gqa(spec, where)
        return spec
    raise CheckpointError(f"{where}: unknown transformation spec {name!r}; crosschip knows FusedLinearsSpec and "
                          "GQAQKVColumnParallelLinearSpec")


def _fields(fields: dict, expected: dict, where: str, name: str) -> None:
    if set(fields) != set(expected):
        missing, extra = sorted(set(expected) - set(fields)), sorted(set(fields) - set(expected))
        raise CheckpointError(f"{where}: {name} fields do not match Optimum Neuron's: missing {missing}, "
                              f"unexpected {extra}")
    for key, kind in expected.items():
        if not isinstance(fields[key], kind) or (kind is int and isinstance(fields[key], bool)):
            raise CheckpointError(f"{where}: {name}.{key} must be {getattr(kind, '__name__', kind)}, "
                                  f"found {fields[key]!r}")


def check_gqa(spec: GQAQKV, where: str) -> None:
    """The sizes of a GQA spec agree with each other (as NxD's layer computes them)."""
    h, kv, m, tp = spec.heads, spec.kv_heads, spec.copies, spec.tp
    ok = (min(h, kv, m, tp) > 0 and h % kv == 0 and h % tp == 0 and (kv * m) % tp == 0
          and spec.q_rows % (h // tp) == 0)
    if ok:
        d = spec.q_rows // (h // tp)
        ok = spec.kv_rows == kv * m // tp * d and (h // tp) % (kv * m // tp) == 0
    if not ok:
        raise CheckpointError(
            f"{where}: GQAQKVColumnParallelLinearSpec sizes disagree: {h} query heads, {kv} KV heads, "
            f"kv_size_multiplier {m}, tp {tp}, {spec.q_rows} query rows and {spec.kv_rows} KV rows per rank")


# -- deriving -----------------------------------------------------------------------------------
def derive(config, shapes: dict[str, tuple], tp: int, kv_layout: str | None, where: str) -> Metadata:
    """The metadata Optimum Neuron would have written for a Llama-family model with ``config``
    whose shards hold ``shapes`` (rank 0's names and shapes) at ``tp``: the replication of KV
    heads is read from the shapes. ``kv_layout`` is needed only where KV heads are replicated."""
    names = list(shapes)
    meta = Metadata(source=f"derived from the model config ({where})")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for name in names:
        meta.parameters[name] = partition_of(name, tp)
    modules = sorted({n.rsplit(".", 2)[0] for n in names if ".self_attn.qkv_proj." in n})
    for module in modules:
        fused = f"{module}.qkv_proj.weight_qkv" in names
        separate = f"{module}.qkv_proj.weight_q" in names
        bias = any(n.startswith(f"{module}.qkv_proj.bias") for n in names)
        if fused or separate:
            q_rows = heads // tp * head_dim
            kv_rows = ((shapes[f"{module}.qkv_proj.weight_qkv"][0] - q_rows) // 2 if fused
                       else shapes[f"{module}.qkv_proj.weight_k"][0])
            copies = max(1, kv_rows * tp // (kv * head_dim))
            layout = TILE if copies == 1 else kv_layout
            if layout is None:
                raise CheckpointError(
                    f"{where}: the KV heads are replicated (kv_size_multiplier {copies}) and there is no metadata to "
                    "say how: name the layout (kv_layout 'tile', as Optimum Neuron and NxD on trn1 place them, or "
                    "'interleave', crosschip on trn2)")
            spec = GQAQKV(module, "qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", heads, kv, copies,
                          q_rows, kv_rows, fused, bias, tp, layout)
            check_gqa(spec, where)
            meta.specs.append(spec)
        elif f"{module}.qkv_proj.weight" in names:  # ColumnParallelLinear(stride=3): q, k, v of equal size
            meta.specs.append(FusedLinears(module, "qkv_proj", ("q_proj", "k_proj", "v_proj"), bias, 0,
                                           (heads * head_dim,) * 3, tp))
            for p in ("weight", "bias"):
                if f"{module}.qkv_proj.{p}" in names:
                    meta.parameters[f"{module}.qkv_proj.{p}"] = Partition(0, 3, tp)
    for name in names:
        if name.endswith(".mlp.gate_up_proj.weight"):
            module = name[: -len(".gate_up_proj.weight")]
            bias = f"{module}.gate_up_proj.bias" in names
            meta.specs.append(FusedLinears(module, "gate_up_proj", ("gate_proj", "up_proj"), bias, 0,
                                           (config.intermediate_size,) * 2, tp))
            for p in ("weight", "bias"):
                if f"{module}.gate_up_proj.{p}" in names:
                    meta.parameters[f"{module}.gate_up_proj.{p}"] = Partition(0, 2, tp)
    return meta


_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")


def partition_of(name: str, tp: int) -> Partition:
    """NxD's layers as Optimum Neuron's Llama builds them: vocab-parallel embedding and LM head,
    column-parallel projections (weight and bias), row-parallel o_proj and down_proj weights
    (their biases whole), everything else (norms) replicated. NxD marks a layer's weights
    parallel at tp=1 too (one partition)."""
    parts = name.split(".")
    module, param = (parts[-2], parts[-1]) if len(parts) > 1 else ("", parts[-1])
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return Partition(0, 1, tp)
    if module in _COLUMN or (module == "qkv_proj" and param.startswith(("weight", "bias"))):
        return Partition(0, 1, tp)
    if module in ("o_proj", "down_proj") and param == "weight":
        return Partition(1, 1, tp)
    return Partition()
