"""Per-token diagnostics of a run's appended rows: which new tokens training saw, how far each row moved from its
initialisation against how often it was seen, and what the extended tokenizer does to held-out text.

A new row's gradient comes from the batches it occurs in (input embedding) or is a target in (head), so a row
never seen in training keeps its initial values, up to weight decay and the head's softmax; averaged metrics
hide that. ``row_report`` gives, per appended token: its piece, occurrences in the training batches the run
consumed, and the relative change ``|final - init| / |init|`` of its embedding and head rows; ``row_metrics``
sums it up by frequency bucket, with the rank correlation of movement and frequency. ``tokenizer_report``: the
share of held-out tokens that are byte-fallback pieces (``<0x..>``) under the base and the extended tokenizer,
and the appended pieces held-out text never uses. A byte-level BPE vocabulary (Llama 3, Qwen) has no such pieces:
every token is bytes, so its rate counts the tokens whose bytes are not whole UTF-8 characters (a lone byte, or
a merge that ends mid-character): the characters the vocabulary could only spell in parts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from bailong.tokenization.byte_level import is_byte_level_bpe, whole_text

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# occurrences in the consumed training batches: never, rare (under-trained), some, frequent
BUCKETS = (("never", 0, 0), ("1-9", 1, 9), ("10-99", 10, 99), ("100+", 100, None))
UNDER_TRAINED = 10  # a row seen fewer times than this (but seen) counts as under-trained


def token_counts(batches: Iterable[np.ndarray], vocab_size: int, chunk_ids: int = 1 << 22) -> np.ndarray:
    """Occurrences of each id in ``batches`` (arrays of token ids), as int64 of length ``vocab_size``. Batches are
    counted ``chunk_ids`` ids at a time: one ``bincount`` per training row would allocate a vocabulary-sized array
    per row (a 7B run consumes millions of rows)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    pending: list[np.ndarray] = []
    size = 0

    def count() -> None:
        nonlocal size
        ids = np.concatenate(pending).astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token_counts: ids outside [0, {vocab_size}) in a training batch")
        counts[:] += np.bincount(ids, minlength=vocab_size)
        pending.clear()
        size = 0

    for batch in batches:
        pending.append(np.asarray(batch).ravel())
        size += pending[-1].size
        if size >= chunk_ids:
            count()
    if pending:
        count()
    return counts


def effective_new_rows(model: Any, num_base: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """The appended rows ``num_base .. vocab_size - 1`` as the model uses them now: the input embedding through its
    forward (peft's trainable tokens, LoRA or a full matrix alike); the head's rows as the fused loss reads them,
    or, for LoRA on the head, its base rows plus peft's delta (no ``head`` entry for any other head)."""
    from peft.tuners.lora import LoraLayer

    from bailong.train.loss import head_weights

    embedding = model.get_input_embeddings()
    ids = torch.arange(num_base, vocab_size, device=next(embedding.parameters()).device)
    with torch.no_grad():
        rows = {"embed": torch.cat([embedding(chunk) for chunk in ids.split(4096)]).float().cpu()}
        head = model.get_output_embeddings()
        weights = head_weights(head) if head is not None else None
        if weights is not None and head is not embedding:
            if weights.rows is not None and weights.ids is not None:  # the trained rows written over the frozen ones
                head_rows = weights.weight[num_base:vocab_size].detach().float().clone()
                appended = (weights.ids >= num_base) & (weights.ids < vocab_size)
                head_rows[weights.ids[appended] - num_base] = weights.rows[appended].detach().float()
                rows["head"] = head_rows.cpu()
            else:  # frozen, or the whole matrix trains
                rows["head"] = weights.weight[num_base:vocab_size].detach().float().cpu()
        elif isinstance(head, LoraLayer) and not head.merged:
            weight = head.get_base_layer().weight[num_base:vocab_size].float()
            for adapter in head.active_adapters:
                weight = weight + head.get_delta_weight(adapter)[num_base:vocab_size].float()
            rows["head"] = weight.cpu()
    return rows


def relative_change(initial: torch.Tensor, final: torch.Tensor) -> np.ndarray:
    """``|final - initial| / |initial|`` per row (L2 norms; a zero initial row divides by 1)."""
    initial, final = initial.float(), final.float()
    norms = initial.norm(dim=1)
    return ((final - initial).norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))).numpy()


def row_report(
    pieces: Sequence[str],
    counts: np.ndarray,
    initial: dict[str, torch.Tensor],
    final: dict[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """One record per appended token, in id order: ``piece``, ``count`` (training occurrences) and the relative
    change of each row kind present in both ``initial`` and ``final``."""
    moves = {kind: relative_change(initial[kind], final[kind]) for kind in ("embed", "head") if kind in initial}
    moves = {kind: move for kind, move in moves.items() if kind in final}
    if any(len(m) != len(pieces) for m in moves.values()) or len(counts) != len(pieces):
        raise ValueError("row_report: pieces, counts and rows must describe the same appended tokens")
    return [
        {"piece": piece, "count": int(counts[i]), **{f"{kind}_change": float(m[i]) for kind, m in moves.items()}}
        for i, piece in enumerate(pieces)
    ]


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def row_metrics(report: list[dict[str, Any]]) -> dict[str, float]:
    """``tokens/*``: appended rows seen and never seen in training, under-trained ones (seen fewer than 10 times),
    the median relative change per frequency bucket and its rank correlation with frequency, per row kind."""
    counts = np.array([r["count"] for r in report], dtype=np.int64)
    metrics: dict[str, float] = {
        "tokens/new_rows": float(len(report)),
        "tokens/new_seen": float((counts > 0).sum()),
        "tokens/new_never_seen": float((counts == 0).sum()),
        "tokens/new_under_trained": float(((counts > 0) & (counts < UNDER_TRAINED)).sum()),
        "tokens/new_occurrences": float(counts.sum()),
    }
    for kind in ("embed", "head"):
        key = f"{kind}_change"
        if not report or key not in report[0]:
            continue
        change = np.array([r[key] for r in report])
        for name, low, high in BUCKETS:
            chosen = (counts >= low) & (counts <= (high if high is not None else counts.max(initial=0)))
            if chosen.any():  # an empty bucket has no key
                metrics[f"tokens/{kind}_change_median_{name}"] = float(np.median(change[chosen]))
        rho = _spearman(counts, change)
        if rho is not None:  # no key where a side is constant (nothing seen, a frozen kind)
            metrics[f"tokens/{kind}_change_vs_count_spearman"] = rho
    return metrics


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [i for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in row]


def byte_piece_ids(tokenizer: Any) -> set[int]:
    """The ids that stand for part of a character: ``<0x..>`` byte-fallback pieces, or in a byte-level BPE
    vocabulary the tokens whose bytes are not whole UTF-8 characters (special tokens excluded)."""
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and is_byte_level_bpe(json.loads(backend.to_str())):
        special = set(getattr(tokenizer, "all_special_ids", ()))
        return {i for token, i in vocab.items() if i not in special and not whole_text(token)}
    return {i for piece, i in vocab.items() if BYTE_PIECE.fullmatch(piece)}


def _byte_share(tokenizer: Any, ids: list[int]) -> float:
    byte_ids = byte_piece_ids(tokenizer)
    return sum(i in byte_ids for i in ids) / len(ids) if ids else 0.0


def byte_fallback_rate(tokenizer: Any, texts: Sequence[str]) -> float:
    """The share of the tokens of ``texts`` that are byte-fallback pieces (``<0x..>``), or for a byte-level BPE
    tokenizer the tokens that are not whole characters (``byte_piece_ids``)."""
    return _byte_share(tokenizer, _ids(tokenizer, texts))


def tokenizer_report(base_tok: Any, tok: Any, num_base: int, held_out: dict[str, Sequence[str]]) -> dict[str, float]:
    """``tokenizer/<lang>_byte_fallback_rate(_base)`` per held-out language and the appended pieces that
    tokenizing all of ``held_out`` never produces (``tokenizer/new_unused_held_out``, count and share)."""
    metrics: dict[str, float] = {}
    used: set[int] = set()
    for lang, texts in held_out.items():
        if not texts:
            continue
        ids = _ids(tok, texts)  # once: the extended tokenizer's rate and the appended pieces used
        metrics[f"tokenizer/{lang}_byte_fallback_rate_base"] = byte_fallback_rate(base_tok, texts)
        metrics[f"tokenizer/{lang}_byte_fallback_rate"] = _byte_share(tok, ids)
        used.update(i for i in ids if i >= num_base)
    added = len(tok) - num_base
    if added > 0:
        metrics["tokenizer/new_unused_held_out"] = float(added - len(used))
        metrics["tokenizer/new_unused_held_out_share"] = (added - len(used)) / added
    return metrics
