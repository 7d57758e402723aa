"""Pre-training token streams: tokenise documents in batches and pack them into fixed-length rows with no padding
(the prepare stage writes these rows to shards per language, ``bailong.data.prepare``; ``bailong.data.shards``
mixes TC and EN rows per step).

Each document becomes ``BOS + doc + EOS``; documents are concatenated and the stream is cut every
``seq_len`` tokens, so a sequence may start or end mid-document and EOS marks every boundary (the
usual packing of GPT/Llama pre-training). The final partial sequence is dropped: fewer than
``seq_len`` tokens per epoch, and no padding anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

TOKENIZE_BATCH_DOCS = 1024  # documents per fast-tokenizer call: large enough for its Rust-side parallelism


def special_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(document-start id, EOS id); packing and scoring both need them explicitly. The start is BOS; a tokenizer
    without one (Qwen 2.5: only ``<|endoftext|>``, the separator its pre-training put between documents) starts a
    document after its EOS instead, so every document is still scored from the same first context token."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has bos_token_id={bos}, eos_token_id={eos}; packing needs an EOS "
            "token (a Llama-style SentencePiece tokenizer has <s>=1 and </s>=2, Llama 3 <|begin_of_text|> and "
            "<|end_of_text|>, Qwen only <|endoftext|>)"
        )
    return int(eos if bos is None else bos), int(eos)


def encode_in_batches(
    tokenizer: Any, docs: Sequence[str], *, batch_docs: int = TOKENIZE_BATCH_DOCS, **kwargs: Any
) -> Iterator[Any]:
    """The tokenizer's encodings of ``docs``, ``batch_docs`` documents per call (its Rust-side parallelism), each
    batch as the tokenizer returns it; no special tokens (callers add BOS/EOS themselves, so the result does not
    depend on the tokenizer's ``add_bos_token`` setting). ``kwargs`` go to the tokenizer call."""
    for start in range(0, len(docs), batch_docs):
        batch = list(docs[start : start + batch_docs])
        if not all(isinstance(d, str) for d in batch):
            bad = next(d for d in batch if not isinstance(d, str))
            raise TypeError(f"documents must be str, got {type(bad).__name__}")
        # verbose=False: long documents are intended here, not an over-length warning
        yield tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False, **kwargs)


def tokenize_documents(
    tokenizer: Any, docs: Sequence[str], *, batch_docs: int = TOKENIZE_BATCH_DOCS
) -> list[np.ndarray]:
    """Token ids of each document, without special tokens."""
    # int32 arrays: a quarter of Python lists' memory
    return [
        np.asarray(x, dtype=np.int32)
        for enc in encode_in_batches(tokenizer, docs, batch_docs=batch_docs)
        for x in enc["input_ids"]
    ]


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
