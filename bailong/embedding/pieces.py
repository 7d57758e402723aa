"""The new tokens of an extended tokenizer and the base pieces each one zips together.

A new SentencePiece piece such as ``▁中國`` is spelled, in the base vocabulary, by the pieces the
base tokenizer's model gives for that same piece string: ``▁`` stays the word-initial-space
marker, so the piece is tokenized as it is, not turned into text with a leading space first
(which the Metaspace pre-tokenizer would prefix with a second ``▁``). A CJK character the base
does not hold comes back as its UTF-8 byte pieces (``<0xE4> <0xB8> <0xAD>``) through byte fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class EmbeddingInitError(ValueError):
    """Bad input to embedding initialisation: the message says what was expected."""


@dataclass(frozen=True)
class NewTokens:
    """The appended ids of an extended tokenizer and, per new token, its base piece ids."""

    num_base: int
    ids: list[int]  # num_base .. vocab_size - 1, in order
    pieces: list[str]  # the new tokens' piece strings
    base_pieces: list[list[int]]  # base ids spelling each new token, in reading order

    @property
    def num_new(self) -> int:
        return len(self.ids)

    def piece_count_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for spelled in self.base_pieces:
            key = str(len(spelled))
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def base_piece_ids(base_tokenizer, piece: str) -> list[int]:
    """Base ids of ``piece`` (a piece string, ``▁`` included) by the base tokenizer's own model."""
    backend = getattr(base_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EmbeddingInitError(
            f"base tokenizer {type(base_tokenizer).__name__} has no `backend_tokenizer`: embedding "
            "initialisation needs a tokenizers-backed (fast) tokenizer to spell new pieces in base pieces"
        )
    # The model alone (no normalizer / pre-tokenizer) maps a piece string to pieces, with byte fallback.
    ids = [token.id for token in backend.model.tokenize(piece)]
    if not ids:
        raise EmbeddingInitError(f"base tokenizer spells the new piece {piece!r} with no pieces at all")
    return ids


def find_new_tokens(base_tokenizer, tokenizer) -> NewTokens:
    """Check that ``tokenizer`` is ``base_tokenizer`` plus appended pieces and spell the new ones."""
    num_base, vocab_size = len(base_tokenizer), len(tokenizer)
    if vocab_size < num_base:
        raise EmbeddingInitError(
            f"extended tokenizer has {vocab_size} tokens, fewer than the base's {num_base}: "
            "it must be the base tokenizer plus appended pieces"
        )
    base_vocab = base_tokenizer.convert_ids_to_tokens(list(range(num_base)))
    kept = tokenizer.convert_ids_to_tokens(list(range(num_base)))
    for i, (old, now) in enumerate(zip(base_vocab, kept)):
        if old != now:
            raise EmbeddingInitError(
                f"extended tokenizer moved base id {i}: base has {old!r}, extended has {now!r}; "
                "old ids must keep their pieces (append new pieces at the end)"
            )
    ids = list(range(num_base, vocab_size))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for i, piece in zip(ids, pieces):
        if piece is None:
            raise EmbeddingInitError(f"extended tokenizer has no piece for id {i} (ids must be contiguous)")
    return NewTokens(num_base, ids, pieces, [base_piece_ids(base_tokenizer, p) for p in pieces])


# How each rule weighs the k pieces of a new token (positions j = 1..k, weights sum to 1).
PIECE_RULES = ("mean", "first", "last", "weighted_first", "weighted_last")


def piece_weights(k: int, rule: str) -> list[float]:
    """Weights over a token's k pieces: ``weighted_last`` is proportional to j, ``weighted_first`` to k+1-j."""
    if rule == "mean":
        raw = [1.0] * k
    elif rule == "first":
        raw = [1.0] + [0.0] * (k - 1)
    elif rule == "last":
        raw = [0.0] * (k - 1) + [1.0]
    elif rule == "weighted_last":
        raw = [float(j) for j in range(1, k + 1)]
    elif rule == "weighted_first":
        raw = [float(k + 1 - j) for j in range(1, k + 1)]
    else:
        raise EmbeddingInitError(f"unknown piece rule {rule!r}; expected one of {', '.join(PIECE_RULES)}")
    total = sum(raw)
    return [w / total for w in raw]


def compose_rows(weight: torch.Tensor, base_pieces: list[list[int]], rule: str) -> torch.Tensor:
    """float32 rows: for each new token, the ``rule``-weighted sum of its pieces' rows of ``weight``."""
    rows, cols, vals = [], [], []
    for r, spelled in enumerate(base_pieces):
        for c, w in zip(spelled, piece_weights(len(spelled), rule)):
            if w:
                rows.append(r)
                cols.append(c)
                vals.append(w)
    # A sparse (num_new x num_base) mixing matrix: one product instead of a Python loop over tokens.
    mix = torch.sparse_coo_tensor(
        torch.tensor([rows, cols], dtype=torch.long),
        torch.tensor(vals, dtype=torch.float32),
        size=(len(base_pieces), weight.shape[0]),
        device=weight.device,
        check_invariants=True,
    ).coalesce()
    return torch.sparse.mm(mix, weight.detach().float())
