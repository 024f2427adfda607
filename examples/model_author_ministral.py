"""Ministral (transformers' MinistralForCausalLM): Mistral's decoder with a sliding window on the
layers its config's ``layer_types`` name. The whole model file of a new family."""

from __future__ import annotations

from transformers import MinistralConfig

from crosschip.models import register_model
from crosschip.models.decoder import DecoderForCausalLM, DecoderOptions
from crosschip.models.hf_config import head_dim_of, kv_heads_of, rope_spec, sliding_windows


@register_model  # from_pretrained builds this class for config.json's "architectures"
class MinistralForCausalLM(DecoderForCausalLM):
    architectures = ("MinistralForCausalLM",)
    config_class = MinistralConfig  # reads config.json

    @classmethod
    def options(cls, config) -> DecoderOptions:
        """The config, field by field, as transformers' modeling_ministral.py reads it."""
        head_dim = head_dim_of(config)  # config.head_dim, else hidden_size // heads
        return DecoderOptions(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=kv_heads_of(config),
            head_dim=head_dim,
            norm_eps=config.rms_norm_eps,
            rope=rope_spec(config, head_dim),  # every rope type of config.rope_parameters
            activation=config.hidden_act,
            # no biases: Ministral's q/k/v/o and MLP projections are bias=False
            tie_embeddings=config.tie_word_embeddings,
            sliding_windows=sliding_windows(config),  # per layer, from config.layer_types
            attention_dropout=config.attention_dropout,
            padding_idx=config.pad_token_id,
        )
