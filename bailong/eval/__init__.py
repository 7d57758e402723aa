"""Evaluation: bits per character/byte of held-out text (``bpc``); evaluations by name
(``bailong.eval.evaluators``)."""

from bailong.eval.bpc import bits_per_char, evaluate_texts

# An evaluator defined outside bailong/eval/evaluators.py registers itself when its module is imported: one
# import line here each, so the registry is complete whenever bailong.eval is imported.

__all__ = ["bits_per_char", "evaluate_texts"]
