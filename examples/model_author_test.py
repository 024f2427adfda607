"""The tests of the Ministral model file: the parity kit against transformers' own class."""

from transformers import MinistralConfig

from crosschip.testing import parity
from model_author_ministral import MinistralForCausalLM

# Tiny, and shaped to exercise what the family adds: sliding and full layers, a window shorter
# than the kit's 16-token inputs, grouped KV heads.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=False)


def test_ministral_matches_transformers(tmp_path):
    report = parity.check_model(MinistralConfig(**TINY), tmp_path)  # raises ParityError on a difference
    assert report.model_class == MinistralForCausalLM.__qualname__


def test_ministral_tensor_parallel(tmp_path):
    parity.check_model(MinistralConfig(**TINY), tmp_path, backends=("torch",), checks=("logits", "tp"), tp=2)
