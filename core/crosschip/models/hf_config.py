"""Reading Hugging Face config fields shared by several architectures."""

from __future__ import annotations

from crosschip.specs import RopeSpec


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def rope_spec(config, head_dim: int, layer_type: str | None = None) -> RopeSpec:
    """The RopeSpec of ``config``'s ``rope_parameters``; with ``layer_type`` (Gemma 3 keeps one set
    per layer type: ``sliding_attention``, ``full_attention``), that type's."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type], layer_type=layer_type)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    original = getattr(config, "original_max_position_embeddings", None)
    if original is not None:
        params.setdefault("original_max_position_embeddings", original)
    frozen = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
    return RopeSpec(head_dim, config.max_position_embeddings, frozen, config=config)


def sliding_windows(config) -> tuple[int | None, ...] | None:
    """Per-layer sliding window from ``layer_types`` (transformers 5), or one window for all
    layers where the config has ``sliding_window`` and no layer types."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window,) * config.num_hidden_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value
