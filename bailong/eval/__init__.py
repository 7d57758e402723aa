"""Evaluation: bits per character/byte of held-out text (``bpc``); evaluations by name
(``bailong.eval.evaluators``).

An evaluator defined outside bailong/eval/evaluators.py registers itself when its module is imported: one import
line here each, so the registry is complete whenever bailong.eval is imported."""

from bailong.eval import harness, parallel  # noqa: F401  (register harness; parallel_bpc, translation)
from bailong.eval.bpc import bits_per_char, evaluate_texts

__all__ = ["bits_per_char", "evaluate_texts"]
