"""Tokenizers for the CLI: a byte-level tokenizer for the built-in corpus, or the Hugging Face
tokenizer files of a model directory."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_NAME = "crosschip_tokenizer.json"


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; 256 is BOS, 257 EOS. Lossless for any UTF-8 text."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, CONFIG_NAME).write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size}) + "\n")


class HFTokenizer:
    """Wraps a transformers tokenizer to the same small interface."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tok.save_pretrained(directory)


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` (crosschip's wrapper) carries a Hugging Face chat template."""
    return bool(getattr(getattr(tokenizer, "tok", None), "chat_template", None))


def chat_prompt(tokenizer, message: str, where: str) -> list[int]:
    """``message`` as the user's turn of a conversation rendered with the tokenizer's chat
    template, ending in the assistant's generation prompt (what the model answers from)."""
    from crosschip.errors import ConfigurationError

    if not has_chat_template(tokenizer):
        kind = "the byte-level tokenizer" if getattr(tokenizer, "tok", None) is None else "its tokenizer"
        raise ConfigurationError(f"--chat: {where} has no chat template ({kind}); give the prompt as plain "
                                 "text without --chat")
    ids = tokenizer.tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    return list(ids)


def check_vocab_fits(tokenizer, vocab_size: int, where: str) -> None:
    """Every token id the tokenizer can produce must index the model's embedding."""
    if tokenizer.vocab_size > vocab_size:
        from crosschip.errors import ConfigurationError

        raise ConfigurationError(f"{where}: the model's vocab_size is {vocab_size}, smaller than its tokenizer's "
                                 f"{tokenizer.vocab_size} tokens (ids past {vocab_size - 1} have no embedding)")


def load_tokenizer(directory: str | Path | None):
    """The tokenizer saved with a model: Hugging Face files if present, else byte-level."""
    if directory is not None:
        directory = Path(directory)
        if (directory / CONFIG_NAME).is_file():
            return ByteTokenizer()
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            # Never code from the directory (auto_map), only the tokenizer files themselves.
            return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                             trust_remote_code=False))
    return ByteTokenizer()
