"""Llama (1, 2, 3, 3.1, 3.2): GQA, RoPE with any rope_scaling, tied or untied embeddings,
optional attention and MLP biases."""

from __future__ import annotations

from transformers import LlamaConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import head_dim_of, rope_spec


@register_model
class LlamaForCausalLM(DecoderForCausalLM):
    architectures = ("LlamaForCausalLM",)
    config_class = LlamaConfig
    ignored_checkpoint_keys = frozenset({"lm_head.weight"})  # only ever ignored when tied

    def __init__(self, config, runtime):
        if not config.tie_word_embeddings:
            self.ignored_checkpoint_keys = frozenset()
        super().__init__(config, runtime)

    @classmethod
    def options(cls, config) -> DecoderOptions:
        head_dim = head_dim_of(config)
        return DecoderOptions(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            norm_eps=config.rms_norm_eps,
            rope=rope_spec(config, head_dim),
            activation=config.hidden_act,
            attention_bias=config.attention_bias,
            mlp_bias=config.mlp_bias,
            tie_embeddings=config.tie_word_embeddings,
            attention_dropout=config.attention_dropout,
            padding_idx=config.pad_token_id,
        )
