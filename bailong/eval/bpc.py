"""Bits per character (and per UTF-8 byte) of held-out text: the measure that compares models with
different tokenizers, since it divides the text's total code length by the text's own size.

The text is cut into scoring windows (``bailong.data.windows``, the rules shared with the training-time
validation loader: whole documents where the model's positions allow, else the same character windows for every
tokenizer); bits/char = total bits / Unicode code points (``len(text)``); bits/byte divides by UTF-8 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from bailong.data.windows import IGNORE_INDEX, collate_windows, scoring_windows

LOGIT_BUDGET = 2**26  # logits per forward chunk (256 MB in float32): bounds memory with a large vocabulary


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


def scoring_seq_len(model: torch.nn.Module, seq_len: int | None) -> int:
    """Positions a scoring window may use: ``seq_len`` if given, else the model's own limit
    (``config.max_position_embeddings``), so documents that fit are scored whole."""
    if seq_len is not None:
        return seq_len
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        raise ValueError(
            f"{type(model).__name__} has no config.max_position_embeddings: give the scoring window's seq_len "
            "(eval.seq_len)"
        )
    return limit


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
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Bits per character of ``texts`` under ``model`` (plain transformers or peft causal LM), in scoring windows
    of ``seq_len`` positions (default: the model's ``max_position_embeddings``).

    Returns ``bpc``, ``bpb``, ``bits``, ``chars``, ``bytes``, ``tokens``, ``tokens_per_char``.
    Runs in eval mode under no_grad and restores each module's train/eval mode afterwards.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = scoring_windows(tokenizer, texts, seq_len=scoring_seq_len(model, seq_len))
    batches = (collate_windows(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size))
    with scoring_mode(model):
        return score_windows(model, batches)


def evaluate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_by_name: Mapping[str, Sequence[str]],
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """``bits_per_char`` for each named text set, keys prefixed by the name:
    ``{"tc_bpc", "tc_bpb", ..., "en_bpc", ...}``."""
    metrics: dict[str, float] = {}
    for name, texts in texts_by_name.items():
        result = bits_per_char(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
        metrics.update({f"{name}_{key}": value for key, value in result.items()})
    return metrics
