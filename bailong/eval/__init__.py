"""Evaluation: bits per character/byte of held-out text (``bpc``)."""

from bailong.eval.bpc import bits_per_char, evaluate_texts

__all__ = ["bits_per_char", "evaluate_texts"]
