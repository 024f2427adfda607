"""Reading Hugging Face config fields shared by several architectures."""

from __future__ import annotations

from crosschip.specs import RopeSpec


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_spec(config, head_dim: int) -> RopeSpec:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    frozen = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
    return RopeSpec(head_dim, config.max_position_embeddings, frozen, config=config)


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value
