"""The tests of the two model files: the parity kit against transformers' own classes."""

from transformers import MinistralConfig, Starcoder2Config

from crosschip.testing import parity
from model_author_ministral import MinistralForCausalLM
from model_author_starcoder2 import Starcoder2ForCausalLM

# Tiny, and shaped to exercise what each family adds: a sliding window shorter than the kit's
# 16-token inputs, grouped KV heads; Ministral's sliding and full layers, StarCoder2's tied head.
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=8,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=6,
             bos_token_id=1, eos_token_id=2)
MINISTRAL = MinistralConfig(**SIZES, num_hidden_layers=3, tie_word_embeddings=False,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
STARCODER2 = Starcoder2Config(**SIZES, num_hidden_layers=2, tie_word_embeddings=True)


def test_ministral_matches_transformers(tmp_path):
    report = parity.check_model(MINISTRAL, tmp_path)  # raises ParityError naming what differs
    assert report.model_class == MinistralForCausalLM.__qualname__


def test_starcoder2_matches_transformers_also_at_tp2(tmp_path):
    report = parity.check_model(STARCODER2, tmp_path, tp=2)
    assert report.model_class == Starcoder2ForCausalLM.__qualname__ and "tp" in report.checks
