"""Named model configurations for ``crosschip train --model NAME``."""

from __future__ import annotations

from crosschip.errors import ConfigurationError
from crosschip.training.tokenizer import ByteTokenizer


def _byte_llama(**sizes):
    """A Llama over the byte-level vocabulary, tied embeddings, sized by ``sizes``."""
    from transformers import LlamaConfig

    tok = ByteTokenizer()
    return LlamaConfig(
        vocab_size=tok.vocab_size, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=None, architectures=["LlamaForCausalLM"], **sizes)


PRESETS = {
    "tiny-llama": lambda: _byte_llama(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "small-llama": lambda: _byte_llama(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
}


def preset_config(name: str):
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigurationError(
            f"--model {name!r} is neither a directory, a Hub model id (org/name) nor a preset; presets: "
            f"{', '.join(sorted(PRESETS))}"
        ) from None
