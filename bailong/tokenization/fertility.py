"""Fertility: tokens per character, the cost of a tokenizer on a language (lower is cheaper)."""

from __future__ import annotations

from collections.abc import Sequence


def tokens_per_char(tokenizer, texts: Sequence[str]) -> float:
    """Total tokens over total characters of ``texts``, without BOS/EOS.

    Pooled rather than averaged per text, so long documents weigh by their length.
    """
    if isinstance(texts, str):
        raise TypeError("tokens_per_char expects a list of texts, not one string")
    num_chars = sum(len(t) for t in texts)
    if num_chars == 0:
        raise ValueError("tokens_per_char: the texts are empty (no characters to measure)")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return sum(len(ids) for ids in encoded) / num_chars
