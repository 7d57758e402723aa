"""Scoring windows: how held-out text is cut into forward passes so that bits per character count every
character exactly once. The data modules build them for validation and the evaluators score them
(``bailong.eval.bpc``); the rules are one definition for both.

- each document is scored alone as ``BOS + doc tokens``; every doc token is scored exactly once,
  BOS is context only and no EOS is appended, so the bits cover exactly the document's characters;
- a document longer than ``seq_len`` is cut into sliding windows that advance by ``stride`` tokens
  (default ``seq_len // 2``): each window scores only tokens no earlier window scored, so every
  scored token after the first window sees at least ``seq_len - stride`` tokens of context; the last
  window is aligned to the document's end so its tokens get a full window. Windows after the first
  start mid-document, as packed training sequences do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bailong.data.packing import special_token_ids, tokenize_documents

IGNORE_INDEX = -100  # a label no loss or score counts (padding, context, the user's turns)


@dataclass(frozen=True)
class ScoringWindow:
    """One forward pass's tokens; ``input_ids[first_scored:]`` are scored. ``n_chars``/``n_bytes``
    carry the whole document's size on its first window and 0 on the others, so sums over windows
    give the text's size."""

    input_ids: tuple[int, ...]
    first_scored: int
    n_chars: int
    n_bytes: int


def window_spans(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over a sequence of ``n_tokens`` (BOS at position 0).

    Window ``k`` feeds positions ``[begin, end)`` and scores positions ``[first_scored, end)``; the
    scored ranges tile ``[1, n_tokens)`` exactly once.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one scored), got {seq_len}")
    if not 1 <= stride <= seq_len - 1:
        # stride == seq_len would leave each later window's first token with no context to score it from
        raise ValueError(f"stride must be in [1, seq_len - 1] = [1, {seq_len - 1}], got {stride}")
    spans: list[tuple[int, int, int]] = []
    begin, scored_until = 0, 1
    while scored_until < n_tokens:
        if begin + seq_len >= n_tokens:
            begin = max(0, n_tokens - seq_len)  # last window: end-aligned for the most context
        end = min(begin + seq_len, n_tokens)
        spans.append((begin, end, scored_until))
        scored_until = end
        begin += stride
    return spans


def scoring_windows(
    tokenizer: Any, texts: Sequence[str], *, seq_len: int, stride: int | None = None
) -> list[ScoringWindow]:
    """All scoring windows of ``texts``, longest first (similar lengths share a batch: little padding).

    Texts that tokenize to nothing (only ``""`` for a SentencePiece tokenizer) are skipped and their
    characters not counted.
    """
    stride = seq_len // 2 if stride is None else stride
    bos, _ = special_token_ids(tokenizer)
    windows: list[ScoringWindow] = []
    for text, ids in zip(texts, tokenize_documents(tokenizer, texts)):
        if len(ids) == 0:
            continue
        sequence = [bos, *ids.tolist()]
        for k, (begin, end, first) in enumerate(window_spans(len(sequence), seq_len, stride)):
            first_window = k == 0
            windows.append(
                ScoringWindow(
                    input_ids=tuple(sequence[begin:end]),
                    first_scored=first - begin,
                    n_chars=len(text) if first_window else 0,
                    n_bytes=len(text.encode("utf-8")) if first_window else 0,
                )
            )
    windows.sort(key=lambda w: -len(w.input_ids))  # stable: ties keep document order
    return windows


def collate_windows(windows: Sequence[ScoringWindow]) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 where not scored),
    ``chars`` and ``bytes`` (each window's ``n_chars``/``n_bytes``). Padding is id 0 under a zero
    mask with label -100: it never counts."""
    length = max(len(w.input_ids) for w in windows)
    input_ids = torch.zeros(len(windows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(windows), length, dtype=torch.long)
    labels = torch.full((len(windows), length), IGNORE_INDEX, dtype=torch.long)
    for row, w in enumerate(windows):
        ids = torch.tensor(w.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, w.first_scored : len(ids)] = ids[w.first_scored :]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "chars": torch.tensor([w.n_chars for w in windows], dtype=torch.long),
        "bytes": torch.tensor([w.n_bytes for w in windows], dtype=torch.long),
    }
