"""Pre-training token streams: tokenise documents in batches, mix TC and EN by share of tokens, and
pack the mix into fixed-length sequences with no padding.

Each document becomes ``BOS + doc + EOS``; documents are concatenated and the stream is cut every
``seq_len`` tokens, so a sequence may start or end mid-document and EOS marks every boundary (the
usual packing of GPT/Llama pre-training). The final partial sequence is dropped: fewer than
``seq_len`` tokens per epoch, and no padding anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TOKENIZE_BATCH_DOCS = 1024  # documents per fast-tokenizer call: large enough for its Rust-side parallelism


def special_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(BOS id, EOS id); packing and scoring both need them explicitly."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has bos_token_id={bos}, eos_token_id={eos}; "
            "packing needs both (a Llama-style SentencePiece tokenizer has <s>=1 and </s>=2)"
        )
    return int(bos), int(eos)


def tokenize_documents(
    tokenizer: Any, docs: Sequence[str], *, batch_docs: int = TOKENIZE_BATCH_DOCS
) -> list[np.ndarray]:
    """Token ids of each document, without special tokens (callers add BOS/EOS themselves, so the
    result does not depend on the tokenizer's ``add_bos_token`` setting)."""
    out: list[np.ndarray] = []
    for start in range(0, len(docs), batch_docs):
        batch = list(docs[start : start + batch_docs])
        if not all(isinstance(d, str) for d in batch):
            bad = next(d for d in batch if not isinstance(d, str))
            raise TypeError(f"documents must be str, got {type(bad).__name__}")
        # verbose=False: long documents are intended here, not an over-length warning
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        out.extend(np.asarray(x, dtype=np.int32) for x in ids)  # int32 arrays: a quarter of Python lists' memory
    return out


@dataclass(frozen=True)
class MixPlan:
    """Which documents make one epoch, in order: ``("tc" | "en", index)`` pairs, plus what it adds up to."""

    docs: list[tuple[str, int]]
    tc_tokens: int
    en_tokens: int
    tc_passes: float  # how many times the TC corpus is used (1.0 = once; >1 = repeated)
    en_passes: float

    @property
    def tc_share(self) -> float:
        return self.tc_tokens / max(1, self.tc_tokens + self.en_tokens)


def _draw_documents(lengths: Sequence[int], target: int, rng: np.random.Generator) -> list[int]:
    """Whole passes over fresh permutations, one document at a time, until ``target`` tokens are reached."""
    picks: list[int] = []
    taken = 0
    while taken < target:
        for i in rng.permutation(len(lengths)):
            if taken >= target:
                break
            picks.append(int(i))
            taken += lengths[i]
    return picks


def plan_mix(tc_lengths: Sequence[int], en_lengths: Sequence[int], tc_ratio: float, seed: int) -> MixPlan:
    """Choose one epoch's documents so that a share ``tc_ratio`` of the tokens is TC.

    Lengths are tokens per document as packed (with BOS and EOS). The side with more tokens than its
    share needs is used exactly once; the other side is repeated (whole shuffled passes, then part
    of one more) until its share is met, so the share is exact up to one document. No text is
    dropped. Both sides' draws and the final interleaving come from ``seed`` only.
    """
    if not 0.0 <= tc_ratio <= 1.0:
        raise ValueError(f"tc_ratio must be in [0, 1], got {tc_ratio}")
    tc_total, en_total = int(sum(tc_lengths)), int(sum(en_lengths))
    if tc_ratio > 0 and tc_total == 0:
        raise ValueError(f"tc_ratio={tc_ratio} asks for TC tokens but the TC training corpus is empty")
    if tc_ratio < 1 and en_total == 0:
        raise ValueError(f"tc_ratio={tc_ratio} asks for EN tokens but the EN training corpus is empty")
    # Targets in whole tokens: the limiting side (the one with the larger total relative to its share) is used once.
    if tc_ratio == 1.0:
        tc_target, en_target = tc_total, 0
    elif tc_ratio == 0.0:
        tc_target, en_target = 0, en_total
    elif tc_total * (1 - tc_ratio) >= en_total * tc_ratio:
        tc_target, en_target = tc_total, int(np.ceil(tc_total * (1 - tc_ratio) / tc_ratio))
    else:
        tc_target, en_target = int(np.ceil(en_total * tc_ratio / (1 - tc_ratio))), en_total
    rng = np.random.default_rng(seed)
    tc_picks = _draw_documents(tc_lengths, tc_target, rng) if tc_target else []
    en_picks = _draw_documents(en_lengths, en_target, rng) if en_target else []
    docs = [("tc", i) for i in tc_picks] + [("en", i) for i in en_picks]
    docs = [docs[i] for i in rng.permutation(len(docs))]
    tc_tokens = int(sum(tc_lengths[i] for i in tc_picks))
    en_tokens = int(sum(en_lengths[i] for i in en_picks))
    return MixPlan(
        docs=docs,
        tc_tokens=tc_tokens,
        en_tokens=en_tokens,
        tc_passes=tc_tokens / tc_total if tc_total else 0.0,
        en_passes=en_tokens / en_total if en_total else 0.0,
    )


def pack_documents(token_docs: Sequence[np.ndarray], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Concatenate ``BOS + doc + EOS`` for each document and cut into rows of ``seq_len`` tokens.

    Returns an int32 tensor ``[n_sequences, seq_len]`` (int32 halves the memory of a large corpus;
    the dataset widens rows to int64 as the embedding expects). The tail shorter than ``seq_len`` is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    total = sum(len(d) + 2 for d in token_docs)
    n_seq = total // seq_len
    if n_seq == 0:
        raise ValueError(
            f"training text is too small to pack: {total} tokens from {len(token_docs)} documents "
            f"make no sequence of seq_len={seq_len}"
        )
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for doc in token_docs:
        stream[pos] = bos_id
        stream[pos + 1 : pos + 1 + len(doc)] = doc
        pos += len(doc) + 1
        stream[pos] = eos_id
        pos += 1
    return torch.from_numpy(stream[: n_seq * seq_len].reshape(n_seq, seq_len))


def pack_mixture(
    tc_docs: Sequence[np.ndarray],
    en_docs: Sequence[np.ndarray],
    *,
    seq_len: int,
    tc_ratio: float,
    seed: int,
    bos_id: int,
    eos_id: int,
) -> tuple[torch.Tensor, MixPlan]:
    """Plan the TC/EN mix of tokenised documents and pack it: ``(sequences, plan)``."""
    plan = plan_mix([len(d) + 2 for d in tc_docs], [len(d) + 2 for d in en_docs], tc_ratio, seed)
    sources = {"tc": tc_docs, "en": en_docs}
    ordered = [sources[lang][i] for lang, i in plan.docs]
    return pack_documents(ordered, seq_len, bos_id, eos_id), plan


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed rows: ``{"input_ids", "labels"}`` with labels = input_ids (the model shifts)."""

    def __init__(self, sequences: torch.Tensor):
        if sequences.ndim != 2:
            raise ValueError(f"expected packed sequences of shape [n, seq_len], got {tuple(sequences.shape)}")
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.sequences[index].long()
        return {"input_ids": row, "labels": row.clone()}


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Shuffles indices with a permutation that is a pure function of ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of each epoch, so a run resumed at epoch k sees the
    same order it would have seen without the interruption (a ``RandomSampler`` with a seeded
    generator would instead depend on how many epochs the generator already ran).
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = start  # samples of the current epoch already consumed before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        start, self.start = self.start, 0  # skip only in the epoch that was interrupted
        return iter(order[start:])
