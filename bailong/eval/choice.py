"""Multiple choice by log-likelihood, normalised by characters so scores compare across tokenizers.

Each choice is scored as a continuation of the question: bits of the choice's tokens given
``BOS + question`` (the scoring machinery of ``bailong.eval.bpc``), divided by the choice's characters.
The prediction is the choice with the fewest bits per character. Per-token or summed log-likelihoods
would favour whichever tokenizer cuts a choice into fewer pieces; bits per character do not.

MC file format (JSON Lines, optionally .gz), one item per line::

    {"question": "床前明月光，\\n", "choices": ["疑是地上霜。", "..."], "answer": 0, "lang": "tc", "id": "..."}

``question`` is the context, written exactly as the text before the choice (include any separator such
as a newline or space at its end); ``choices`` are two or more distinct non-empty strings; ``answer`` is
the 0-based index of the right one; ``lang`` (``tc``/``en``/...) and ``id`` are optional labels.
Errors name the file, the line and the key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bailong.data.corpus import CorpusError, read_jsonl, write_jsonl
from bailong.data.packing import special_token_ids
from bailong.data.windows import ScoringWindow, collate_windows
from bailong.eval.bpc import score_batch, scoring_mode


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    lang: str | None = None
    id: str | None = None
    source: str = field(default="", compare=False)  # "file:line", for messages


def parse_item(record: Any, where: str) -> MCItem:
    """One MC item from a decoded JSON value; ``where`` ("file:line") prefixes every error."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str):
        raise CorpusError(f"{where}: 'question' must be a string (found keys: {', '.join(sorted(record))})")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise CorpusError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    if len(set(choices)) != len(choices):
        raise CorpusError(f"{where}: 'choices' repeat a string; each choice must be distinct")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise CorpusError(f"{where}: 'answer' must be a 0-based index below {len(choices)}, got {answer!r}")
    lang, item_id = record.get("lang"), record.get("id")
    if lang is not None and not isinstance(lang, str):
        raise CorpusError(f'{where}: \'lang\' must be a string such as "tc" or "en", got {lang!r}')
    return MCItem(question, tuple(choices), answer, lang, None if item_id is None else str(item_id), where)


def load_mc_file(path: str | Path) -> list[MCItem]:
    """Every item of an MC JSONL file (format in the module docstring); an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MC file not found")
    items = []
    for where, record in read_jsonl(path):
        items.append(parse_item(record, where))
    if not items:
        raise CorpusError(f"{path}: no MC items (expected one JSON object per line)")
    return items


def write_mc_file(items: Sequence[MCItem], path: str | Path) -> Path:
    def record(it: MCItem) -> dict:
        optional = {k: v for k, v in (("lang", it.lang), ("id", it.id)) if v is not None}
        return {"question": it.question, "choices": list(it.choices), "answer": it.answer, **optional}

    return write_jsonl(map(record, items), path)


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` cut from the tokens of the joined text, so the continuation is
    tokenized as it would be inside running text (no spurious word-start marker). If the last context
    token merges across the boundary, the merged token goes to the continuation."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    n = 0
    while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
        n += 1
    if n == len(whole):
        n -= 1  # the continuation must own at least one token
    return whole[:n], whole[n:]


def choice_windows(tokenizer: Any, item: MCItem, max_len: int) -> list[ScoringWindow]:
    """One scoring window per choice: ``BOS + question + choice``, scoring the choice's tokens; the
    question is cut from the left when the window would exceed ``max_len`` tokens."""
    bos, _ = special_token_ids(tokenizer)
    windows = []
    for choice in item.choices:
        ctx, cont = continuation_ids(tokenizer, item.question, choice)
        if len(cont) + 1 > max_len:
            raise ValueError(f"{item.source}: a choice is {len(cont)} tokens, longer than max_len={max_len}")
        ctx = ctx[max(0, len(ctx) + len(cont) + 1 - max_len) :]
        ids = (bos, *ctx, *cont)
        windows.append(
            ScoringWindow(ids, first_scored=1 + len(ctx), n_chars=len(choice), n_bytes=len(choice.encode("utf-8")))
        )
    return windows


@dataclass
class MCResult:
    accuracy: float
    chance: float  # expected accuracy of a uniform guess: mean of 1 / #choices
    n: int
    predictions: list[dict]

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_acc": self.accuracy,
            f"{prefix}_acc_stderr": accuracy_stderr(self.accuracy, self.n),
            f"{prefix}_chance": self.chance,
            f"{prefix}_n": float(self.n),
        }


def score_choices(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[MCItem], *, max_len: int = 512, batch_size: int = 16
) -> MCResult:
    """Accuracy of the fewest-bits-per-character choice over ``items``, with each item's per-choice scores."""
    if not items:
        raise ValueError("no MC items to score")
    windows = [w for item in items for w in choice_windows(tokenizer, item, max_len)]
    bits: list[float] = []
    with scoring_mode(model):
        for start in range(0, len(windows), batch_size):
            bits += score_batch(model, collate_windows(windows[start : start + batch_size])).tolist()
    predictions, correct, offset = [], 0, 0
    for item in items:
        bpc = [bits[offset + k] / max(1, len(c)) for k, c in enumerate(item.choices)]
        offset += len(item.choices)
        pred = min(range(len(bpc)), key=bpc.__getitem__)
        correct += pred == item.answer
        predictions.append(
            {
                "id": item.id,
                "lang": item.lang,
                "answer": item.answer,
                "predicted": pred,
                "bpc": [round(b, 4) for b in bpc],
            }
        )
    chance = sum(1 / len(it.choices) for it in items) / len(items)
    return MCResult(correct / len(items), chance, len(items), predictions)


def accuracy_stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy over ``n`` items (for reading small-set differences)."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else float("nan")
