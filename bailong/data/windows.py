"""Scoring windows: how held-out text is cut into forward passes so that bits per character count every
character exactly once, and so that two tokenizers of one model are scored on equal terms. The data modules
build them for validation and the evaluators score them (``bailong.eval.bpc``); the rules are one definition
for both.

Windows are cut in **characters**, never in tokens: a window's size is a budget of UTF-8 bytes,
``seq_len - 2`` (``seq_len``: the model's positions a window may use). No tokenizer bailong handles makes more
tokens than the text has bytes, plus the dummy-prefix piece, plus BOS (a SentencePiece byte-fallback piece or a
byte-level BPE piece each cover at least one byte), so a window always fits; each window is checked anyway.

- a document of at most ``seq_len - 2`` bytes is scored **whole**, in one pass, as ``BOS + doc tokens``: every
  doc token is scored once, BOS is context only and no EOS is appended, so the bits cover exactly its characters;
- a longer document is cut at **the same character offsets whatever the tokenizer**: each window holds at most
  the byte budget, scores the characters no earlier window scored, and keeps the characters just before them as
  context (about half the budget; the last window is aligned to the document's end for the most context). A
  token belongs to the window its first character falls in, so the document is tokenized once and every token is
  scored exactly once. Windows after the first start mid-document, without BOS, as packed training rows do.

Cutting by tokens instead would favour the tokenizer with fewer tokens per character: a 256-token window holds
about 300 Chinese characters with the extended tokenizer and 190 with the base's, so the extended model would
be scored with more context.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np
import torch

from bailong.data.packing import encode_in_batches, special_token_ids

IGNORE_INDEX = -100  # a label no loss or score counts (padding, context, the user's turns)
RESERVED_POSITIONS = 2  # BOS and a dummy-prefix piece: positions a window's bytes may not use
MIN_SEQ_LEN = RESERVED_POSITIONS + 8  # a byte budget of 8: half of it (the context) still holds a 4-byte character
# what a cached score depends on besides the text and the model: bump when the rules above change
WINDOW_RULES = "characters in a UTF-8 byte budget of seq_len - 2, half as context"


@dataclass(frozen=True)
class ScoringWindow:
    """One forward pass's tokens; ``input_ids[first_scored:]`` are scored. ``n_chars``/``n_bytes``
    carry the whole document's size on its first window and 0 on the others, so sums over windows
    give the text's size. ``char_span``: the document's characters ``(begin, first scored, end)`` it covers,
    the same for every tokenizer."""

    input_ids: tuple[int, ...]
    first_scored: int
    n_chars: int
    n_bytes: int
    char_span: tuple[int, int, int] = (0, 0, 0)


def window_spans(char_bytes: Sequence[int], byte_budget: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` character windows over a document whose characters take ``char_bytes``
    UTF-8 bytes each.

    Window ``k`` feeds characters ``[begin, end)`` (at most ``byte_budget`` bytes) and scores ``[first_scored,
    end)``; the scored ranges tile ``[0, len(char_bytes))`` exactly once. A document within the budget is one
    window ``(0, n, 0)``.
    """
    if byte_budget < MIN_SEQ_LEN - RESERVED_POSITIONS:
        raise ValueError(f"byte_budget must be at least {MIN_SEQ_LEN - RESERVED_POSITIONS}, got {byte_budget}")
    n = len(char_bytes)
    cum = [0, *accumulate(char_bytes)]  # cum[i]: bytes before character i
    spans: list[tuple[int, int, int]] = []
    begin, scored_until = 0, 0
    while scored_until < n:
        end = bisect.bisect_right(cum, cum[begin] + byte_budget) - 1  # the most characters that fit
        if end >= n:  # last window: end-aligned, as much context as fits
            end = n
            begin = bisect.bisect_left(cum, cum[n] - byte_budget)
        spans.append((begin, end, scored_until))
        scored_until = end
        # the next window keeps about half the budget of context (the characters just before it scores)
        begin = bisect.bisect_left(cum, cum[end] - byte_budget // 2)
    return spans


def tokenize_with_offsets(tokenizer: Any, docs: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(token ids, first character of each token)`` of each document, without special tokens."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        for enc in encode_in_batches(tokenizer, docs, return_offsets_mapping=True):
            for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
                starts = np.asarray([s for s, _ in offsets], dtype=np.int64).reshape(-1)
                out.append((np.asarray(ids, dtype=np.int64), starts))
    except NotImplementedError as err:  # a slow (pure Python) tokenizer has no offsets
        raise TypeError(
            f"scoring windows need token offsets: {type(tokenizer).__name__} is not a fast tokenizer "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        ) from err
    return out


def scoring_windows(tokenizer: Any, texts: Sequence[str], *, seq_len: int) -> list[ScoringWindow]:
    """All scoring windows of ``texts`` for a model that may use ``seq_len`` positions per window, longest first
    (similar lengths share a batch: little padding).

    Texts that tokenize to nothing (only ``""`` for a SentencePiece tokenizer) are skipped and their
    characters not counted.
    """
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len must be at least {MIN_SEQ_LEN} positions per scoring window, got {seq_len}")
    bos, _ = special_token_ids(tokenizer)
    budget = seq_len - RESERVED_POSITIONS
    windows: list[ScoringWindow] = []
    for doc, (text, (ids, starts)) in enumerate(zip(texts, tokenize_with_offsets(tokenizer, texts))):
        if len(ids) == 0:
            continue
        # a token's character: its offset's start, within the text (some pieces, e.g. a trailing "▁", end it)
        starts = np.clip(starts, 0, len(text) - 1)
        n_bytes = len(text.encode("utf-8"))
        spans = [(0, len(text), 0)] if n_bytes <= budget else window_spans([len(c.encode()) for c in text], budget)
        for begin, end, first in spans:
            lo, scored_lo, hi = np.searchsorted(starts, [begin, first, end], side="left").tolist()
            if scored_lo == hi:
                continue  # every character here belongs to a token that started earlier
            if begin == 0:
                window_ids, first_scored = [bos, *ids[:hi].tolist()], scored_lo + 1
            else:
                lo = min(lo, scored_lo - 1)  # at least one token of context to predict the first scored one
                window_ids, first_scored = ids[lo:hi].tolist(), scored_lo - lo
            if len(window_ids) > seq_len:
                raise ValueError(
                    f"document {doc}: characters {begin}..{end} ({sum(len(c.encode()) for c in text[begin:end])} "
                    f"bytes) make {len(window_ids)} tokens with {type(tokenizer).__name__}, over the window's "
                    f"{seq_len} positions: this tokenizer makes more tokens than bytes; lower eval.seq_len"
                )
            first_window = first == 0
            windows.append(
                ScoringWindow(
                    input_ids=tuple(window_ids),
                    first_scored=first_scored,
                    n_chars=len(text) if first_window else 0,
                    n_bytes=n_bytes if first_window else 0,
                    char_span=(begin, first, end),
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
