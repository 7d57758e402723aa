"""Extend a Llama-style SentencePiece tokenizer with Traditional Chinese pieces (pipeline stage 1)."""

from .extend import ExtendedTokenizer, extend_tokenizer, load_tokenizer
from .fertility import tokens_per_char
from .train import TokenizerConfigError

__all__ = ["ExtendedTokenizer", "TokenizerConfigError", "extend_tokenizer", "load_tokenizer", "tokens_per_char"]
