"""Tiny random configs for every model of the zoo, each exercising what makes it distinct."""

from __future__ import annotations

from pathlib import Path

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def _cfg(config_cls, **overrides):
    kwargs = dict(BASE)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _neox(config_cls, **overrides):
    """GPT-NeoX configs name their sizes differently (no KV heads: multi-head attention)."""
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  max_position_embeddings=128, layer_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def zoo_configs() -> dict:
    from transformers import (Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, GraniteConfig, LlamaConfig,
                              MistralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

    return {
        "llama3.2_tied": (_cfg(LlamaConfig, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), "LlamaForCausalLM"),
        "llama_dynamic_rope": (_cfg(LlamaConfig, max_position_embeddings=24, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "LlamaForCausalLM"),
        "mistral_sliding": (_cfg(MistralConfig, sliding_window=8), "MistralForCausalLM"),
        "qwen2_bias_gqa1": (_cfg(Qwen2Config, num_key_value_heads=8), "Qwen2ForCausalLM"),
        "qwen2_sliding_layers": (_cfg(Qwen2Config, num_hidden_layers=3, use_sliding_window=True,
                                      sliding_window=6, max_window_layers=1), "Qwen2ForCausalLM"),
        "qwen3_qknorm_headdim": (_cfg(Qwen3Config, head_dim=16, hidden_size=48, num_attention_heads=6,
                                      num_key_value_heads=3), "Qwen3ForCausalLM"),
        "qwen3_gqa7_yarn": (_cfg(Qwen3Config, num_attention_heads=7, num_key_value_heads=1, hidden_size=56,
                                 head_dim=8, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                 "factor": 4.0, "original_max_position_embeddings": 32}), "Qwen3ForCausalLM"),
        "granite_multipliers": (_cfg(GraniteConfig, embedding_multiplier=12.0, residual_multiplier=0.22,
                                     attention_multiplier=0.0078125, logits_scaling=8.0, attention_bias=True,
                                     mlp_bias=True), "GraniteForCausalLM"),
        "phi3_fused": (_cfg(Phi3Config, pad_token_id=0), "Phi3ForCausalLM"),
        "phi3_longrope_partial": (_cfg(Phi3Config, pad_token_id=0, max_position_embeddings=64,
                                       original_max_position_embeddings=16, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1], "long_factor": [1.5, 2.5],
            "original_max_position_embeddings": 16}), "Phi3ForCausalLM"),
        # Post-norms and q/k norms over the whole projection.
        "olmo2_post_norms": (_cfg(Olmo2Config), "Olmo2ForCausalLM"),
        # (1 + w) sandwich norms, sqrt(hidden) embeddings, soft-capped attention and logits, a
        # sliding layer whose window the 40-token test sequences exceed.
        "gemma2_softcaps": (_cfg(Gemma2Config, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                 attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                 layer_types=["sliding_attention", "full_attention"]), "Gemma2ForCausalLM"),
        # Per-head (1 + w) q/k norms, local and global RoPE (a scaled global one).
        "gemma3_local_global": (_cfg(Gemma3TextConfig, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                     num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                       "sliding_attention"],
                                     rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                      "full_attention": {"rope_type": "linear", "rope_theta": 100000.0,
                                                                         "factor": 4.0}}), "Gemma3ForCausalLM"),
        # RoPE left out on the second layer (NoPE).
        "smollm3_nope": (_cfg(SmolLM3Config, no_rope_layers=[1, 0], pad_token_id=0), "SmolLM3ForCausalLM"),
        # Pythia: LayerNorms, a GELU MLP, attention and MLP in parallel, rotary on a quarter of each head.
        "gpt_neox_parallel": (_neox(GPTNeoXConfig, use_parallel_residual=True), "GPTNeoXForCausalLM"),
        "gpt_neox_sequential_full_rotary": (_neox(GPTNeoXConfig, use_parallel_residual=False, attention_bias=False,
                                                  rotary_pct=1.0), "GPTNeoXForCausalLM"),
    }


def save_hf(path: Path, config, seed: int = 0):
    """A random transformers model for ``config`` (the parity kit's: norms and biases moved off
    their no-op values) saved to ``path``; returns it in eval mode."""
    from crosschip.testing.parity import random_transformers_model

    model = random_transformers_model(config, seed)
    model.save_pretrained(path)
    return model
