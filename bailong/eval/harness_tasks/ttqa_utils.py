"""TTQA's scoring for lm-evaluation-harness (``ttqa_local.yaml``): an answer is right when any accepted name
occurs in the generated text. Plain substring match, no normalisation: the data lists each accepted spelling
(臺灣/台灣 variants included), and a Simplified Chinese answer is not one of them."""

from __future__ import annotations


def is_correct(response: str, accepted: list[str]) -> bool:
    return any(name.strip() and name.strip() in response for name in accepted)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": float(is_correct(results[0], doc["correct_answers"]))}
