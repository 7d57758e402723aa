"""Bits per character (and per UTF-8 byte) of held-out text: the measure that compares models with
different tokenizers, since it divides the text's total code length by the text's own size.

Scoring rules, identical for the evaluator and the training-time validation loader:
- each document is scored alone as ``BOS + doc tokens``; every doc token is scored exactly once,
  BOS is context only and no EOS is appended, so the bits cover exactly the document's characters;
- a document longer than ``seq_len`` is cut into sliding windows that advance by ``stride`` tokens
  (default ``seq_len // 2``): each window scores only tokens no earlier window scored, so every
  scored token after the first window sees at least ``seq_len - stride`` tokens of context; the last
  window is aligned to the document's end so its tokens get a full window. Windows after the first
  start mid-document, as packed training sequences do;
- bits/char = total bits / Unicode code points (``len(text)``); bits/byte divides by UTF-8 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bailong.data.packing import special_token_ids, tokenize_documents

IGNORE_INDEX = -100
LOGIT_BUDGET = 2**26  # logits per forward chunk (256 MB in float32): bounds memory with a large vocabulary


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


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_batch(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, logit_budget: int = LOGIT_BUDGET
) -> torch.Tensor:
    """Bits (float64) of the scored tokens of each window in ``batch``, shape ``[batch]``.

    ``labels`` follow the transformers convention (aligned with ``input_ids``; the logit at position
    t predicts label t+1). The caller sets eval mode and no_grad (see ``scoring_mode``); Lightning
    does both in validation. Rows go through the model in chunks of at most ``logit_budget`` logits.
    """
    device = _device_of(model)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    rows, length = input_ids.shape
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    rows_per_pass = max(1, logit_budget // (length * vocab))
    bits = []
    for start in range(0, rows, rows_per_pass):
        part = slice(start, start + rows_per_pass)
        logits = model(input_ids=input_ids[part], attention_mask=attention_mask[part], use_cache=False).logits
        targets = labels[part, 1:]
        nats = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        bits.append(nats.view(targets.shape).double().sum(dim=1) / math.log(2))
        del logits, nats
    return torch.cat(bits).cpu()


@contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; on exit every module gets back its own train/eval flag
    (training resumes right after validation, and some modules may have been in eval on purpose)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        # modules() is parents-first, and train() recurses, so later entries correct their subtrees;
        # train() rather than setting .training keeps the side effects some modules attach to it (DoRA caches).
        for module, was_training in modes:
            if module.training != was_training:
                module.train(was_training)


def summarize(bits: float, chars: int, n_bytes: int, tokens: int) -> dict[str, float]:
    """The reported numbers for a text of ``chars`` characters coded in ``bits`` over ``tokens`` tokens."""
    if chars <= 0:
        raise ValueError("no characters were scored: the evaluation text is empty")
    return {
        "bpc": bits / chars,
        "bpb": bits / n_bytes,
        "bits": bits,
        "chars": chars,
        "bytes": n_bytes,
        "tokens": tokens,
        "tokens_per_char": tokens / chars,
    }


def score_windows(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Sum bits, characters, bytes and scored tokens over batches of ``collate_windows``."""
    bits, chars, n_bytes, tokens = 0.0, 0, 0, 0
    for batch in batches:
        bits += float(score_batch(model, batch).sum())
        chars += int(batch["chars"].sum())
        n_bytes += int(batch["bytes"].sum())
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return summarize(bits, chars, n_bytes, tokens)


def bits_per_char(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int,
    batch_size: int = 8,
    stride: int | None = None,
) -> dict[str, float]:
    """Bits per character of ``texts`` under ``model`` (plain transformers or peft causal LM).

    Returns ``bpc``, ``bpb``, ``bits``, ``chars``, ``bytes``, ``tokens``, ``tokens_per_char``.
    Runs in eval mode under no_grad and restores each module's train/eval mode afterwards.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = scoring_windows(tokenizer, texts, seq_len=seq_len, stride=stride)
    batches = (collate_windows(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size))
    with scoring_mode(model):
        return score_windows(model, batches)


def evaluate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_by_name: Mapping[str, Sequence[str]],
    seq_len: int,
    batch_size: int = 8,
    stride: int | None = None,
) -> dict[str, float]:
    """``bits_per_char`` for each named text set, keys prefixed by the name:
    ``{"tc_bpc", "tc_bpb", ..., "en_bpc", ...}``."""
    metrics: dict[str, float] = {}
    for name, texts in texts_by_name.items():
        result = bits_per_char(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, stride=stride)
        metrics.update({f"{name}_{key}": value for key, value in result.items()})
    return metrics
