"""Extend a Llama-style SentencePiece tokenizer with Traditional Chinese pieces (pipeline stage 1)."""

from .extend import SP_MODEL_FILE, ExtendedTokenizer, extend_tokenizer, load_tokenizer, sentencepiece_matches
from .fertility import tokens_per_char
from .train import TokenizerConfigError

__all__ = [
    "SP_MODEL_FILE",
    "ExtendedTokenizer",
    "TokenizerConfigError",
    "extend_tokenizer",
    "load_tokenizer",
    "sentencepiece_matches",
    "tokens_per_char",
]
