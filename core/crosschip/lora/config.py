"""``LoraConfig`` and its Hugging Face PEFT ``adapter_config.json`` form."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from crosschip.errors import CheckpointError, ConfigurationError

#: Hugging Face projection names an adapter may target (the last part of a weight's module name).
#: Hugging Face projection names; ``qkv_proj`` and ``gate_up_proj`` are those of checkpoints that
#: store them fused (Phi-3), targeted whole as PEFT does.
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                 "down_proj", "lm_head")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("default", "gaussian", "zeros")

#: PEFT options whose non-default values change what an adapter computes and that crosschip
#: does not implement: refused when reading, rather than loading an adapter that means
#: something else.
_UNSUPPORTED = {
    "bias": ("none",), "fan_in_fan_out": (False,), "lora_bias": (False,), "modules_to_save": (None, []),
    "layers_to_transform": (None,), "layers_pattern": (None,), "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None), "target_parameters": (None, []), "exclude_modules": (None, []),
    "layer_replication": (None,), "use_qalora": (False, None), "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,), "use_bdlora": (None, False),
}


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA (or DoRA) adapter: rank ``r``, scale ``alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``), dropout on the adapter's input, and the Hugging Face projection names it
    targets. ``init``: ``"default"`` (PEFT's: Kaiming-uniform ``lora_A``, zero ``lora_B``, so a
    new adapter changes nothing), ``"gaussian"`` (normal ``lora_A`` with std ``1/r``, zero
    ``lora_B``) or ``"zeros"`` (both zero)."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "default"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigurationError(f"LoraConfig.r must be a positive integer, found {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigurationError(f"LoraConfig.alpha must be a positive number, found {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(f"LoraConfig.dropout must be in [0, 1), found {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigurationError(f"LoraConfig.init={self.init!r}: expected one of {', '.join(INITS)}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        if not targets:
            raise ConfigurationError("LoraConfig.target_modules is empty: name at least one projection "
                                     f"({', '.join(KNOWN_TARGETS)})")
        unknown = [t for t in targets if t not in KNOWN_TARGETS]
        if unknown:
            raise ConfigurationError(f"LoraConfig.target_modules: unknown name {unknown[0]!r}; expected "
                                     f"Hugging Face projection names: {', '.join(KNOWN_TARGETS)}")
        object.__setattr__(self, "target_modules", tuple(sorted(set(targets), key=KNOWN_TARGETS.index)))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    # -- PEFT's adapter_config.json -----------------------------------------------------------
    def to_peft(self, base_model: str | None = None) -> dict:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules), "use_dora": self.use_dora,
            "use_rslora": self.use_rslora, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "zeros": False}[self.init],
            "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, raw: dict, where: str = "adapter_config.json") -> "LoraConfig":
        if raw.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where}: peft_type {raw.get('peft_type')!r}, expected 'LORA'")
        for key, allowed in _UNSUPPORTED.items():
            if key in raw and raw[key] not in allowed:
                raise CheckpointError(f"{where}: {key}={raw[key]!r} is not supported (expected "
                                      f"{' or '.join(repr(a) for a in allowed)})")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            raise CheckpointError(f"{where}: target_modules is a pattern ({targets!r}); crosschip reads a "
                                  f"list of projection names ({', '.join(KNOWN_TARGETS)})")
        init = raw.get("init_lora_weights", True)
        try:
            return cls(r=raw["r"], alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                       target_modules=tuple(targets or ()), use_dora=bool(raw.get("use_dora", False)),
                       use_rslora=bool(raw.get("use_rslora", False)),
                       init={True: "default", False: "zeros"}.get(init, init if init in INITS else "default"))
        except KeyError as exc:
            raise CheckpointError(f"{where}: missing {exc.args[0]!r}") from exc
        except ConfigurationError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc

    @classmethod
    def read(cls, directory: str | Path) -> "LoraConfig":
        path = Path(directory) / "adapter_config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a PEFT adapter directory holds adapter_config.json "
                                  "and adapter_model.safetensors)")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_peft(raw, where=str(path))

    @classmethod
    def parse(cls, text: str, where: str = "--lora") -> "LoraConfig":
        """``r=16,alpha=32[,dropout=0.05][,dora][,rslora][,targets=q_proj+v_proj]``."""
        values: dict = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq and key in ("dora", "rslora"):
                values["use_" + key] = True
                continue
            convert = {"r": int, "alpha": float, "dropout": float, "init": str,
                       "targets": lambda v: tuple(v.split("+"))}.get(key)
            if convert is None or not eq:
                raise ConfigurationError(f"{where}: {item!r} is not one of r=N, alpha=X, dropout=P, init=NAME, "
                                         "targets=a+b, dora, rslora")
            try:
                values["target_modules" if key == "targets" else key] = convert(value)
            except ValueError as exc:
                raise ConfigurationError(f"{where}: {item!r}: {exc}") from exc
        try:
            return cls(**values)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
