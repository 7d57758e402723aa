"""The SFT DataModule: chat conversations → packed training rows, held-out conversations for validation.

Training rows come from ``pack_conversations`` (``input_ids``, ``labels`` on assistant tokens only,
``position_ids`` restarting per conversation); validation batches are whole held-out conversations with
``chars`` = the characters of their assistant replies, so ``PretrainModule``'s validation reports
``val/chat_bpc``: bits per character of the held-out answers, comparable across tokenizers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from bailong.cache import cache_key
from bailong.data.chat import (
    Conversation,
    EncodedChat,
    collate_chats,
    encode_conversation,
    load_conversations,
    pack_conversations,
)
from bailong.data.config import ChatCorpusConfig, DataConfig, expect_config
from bailong.data.corpus import split_keys
from bailong.data.instruct import cached_instruct_set
from bailong.data.packing import EpochShuffleSampler

log = logging.getLogger(__name__)


def load_chat_splits(data: DataConfig, cache_dir: str | Path) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) conversations of ``data.chat``: the generated Tang-poem set (train poems and dev poems of the
    prepared split, bailong/data/instruct.py) plus each chat file split three ways by a hash of the conversation
    (``split_keys``: ``data.val_fraction``, ``data.test_fraction``, ``data.split_seed``): ``train`` is trained on,
    ``dev`` validates, ``test`` is in neither."""
    expect_config(data, DataConfig, "load_chat_splits(data)")
    chat = data.chat
    if chat is None:
        raise ValueError("data.chat is not set: the SFT stage needs chat data (e.g. data=sft_chat)")
    train: list[Conversation] = []
    val: list[Conversation] = []
    if chat.instruct is not None:
        folder = cached_instruct_set(chat.instruct, data=data, cache_dir=cache_dir)
        train += load_conversations(ChatCorpusConfig(path=str(folder / "train.jsonl"), format="jsonl"))
        val += load_conversations(ChatCorpusConfig(path=str(folder / "val.jsonl"), format="jsonl"))[: chat.max_val]
    for spec in chat.files:
        convs = load_conversations(spec)
        keys = [cache_key(c) for c in convs]  # split by content, as pre-training documents are
        split = split_keys(keys, data.split_seed, data.val_fraction, data.test_fraction)
        train += [c for c, s in zip(convs, split) if s == "train"]
        val += [c for c, s in zip(convs, split) if s == "dev"][: chat.max_val]
    if not train:
        raise ValueError("data.chat: no training conversations (set data.chat.instruct or data.chat.files)")
    return train, val


class SFTDataModule(pl.LightningDataModule):
    val_names = ("chat",)

    def __init__(
        self,
        tokenizer: Any,
        train: Sequence[Conversation],
        val: Sequence[Conversation],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        packing: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokenizer, self.train_convs, self.val_convs = tokenizer, list(train), list(val)
        self.seq_len, self.batch_size, self.seed, self.packing = seq_len, batch_size, seed, packing
        self.num_workers = num_workers
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id  # never scored: labels are -100 there
        self._rows: dict[str, torch.Tensor] | None = None
        self._val: list[EncodedChat] | None = None

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        data: DataConfig,
        train: Sequence[Conversation],
        val: Sequence[Conversation],
        *,
        seed: int,
    ) -> SFTDataModule:
        """The data module of ``data`` (``seq_len``, ``batch_size``, ``num_workers``, ``chat.packing``) on the
        conversations of ``load_chat_splits(data, cache_dir)``."""
        expect_config(data, DataConfig, "SFTDataModule.from_config(data)")
        if data.chat is None:
            raise ValueError("data.chat is not set: the SFT stage needs chat data (e.g. data=sft_chat)")
        return cls(
            tokenizer,
            train,
            val,
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            seed=seed,
            packing=data.chat.packing,
            num_workers=data.num_workers,
        )

    @property
    def train_rows(self) -> dict[str, torch.Tensor]:
        if self._rows is None:
            encoded = [encode_conversation(self.tokenizer, c) for c in self.train_convs]
            self._rows = pack_conversations(encoded, self.seq_len, self.pad_id, packing=self.packing)
            n = self._rows["input_ids"].shape[0]
            if n < self.batch_size:
                raise ValueError(
                    f"{len(encoded)} conversations make {n} rows, fewer than one batch of {self.batch_size}"
                )
            fill = sum(min(len(e.input_ids), self.seq_len) for e in encoded) / (n * self.seq_len)
            log.info(
                "SFT: %d conversations packed into %d rows of %d tokens (%.1f%% filled, %d answer tokens)",
                len(encoded),
                n,
                self.seq_len,
                100 * fill,
                int((self._rows["labels"] != -100).sum()),
            )
        return self._rows

    @property
    def val_chats(self) -> list[EncodedChat]:
        if self._val is None:
            self._val = [encode_conversation(self.tokenizer, c) for c in self.val_convs]
            self._val = [
                EncodedChat(e.input_ids[: self.seq_len], e.labels[: self.seq_len], e.answer_chars, e.answer_bytes)
                for e in self._val
            ]
        return self._val

    def train_dataloader(self) -> DataLoader:
        rows = self.train_rows
        dataset = [{k: v[i] for k, v in rows.items()} for i in range(rows["input_ids"].shape[0])]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            sampler=EpochShuffleSampler(len(dataset), self.seed),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_chats:
            return []
        return [
            DataLoader(
                self.val_chats,
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=partial(collate_chats, pad_id=self.pad_id),
            )
        ]

    def val_batches(self):
        """The validation batches outside Lightning (the stage's before/after ``chat_bpc``)."""
        return (
            collate_chats(self.val_chats[i : i + self.batch_size], self.pad_id)
            for i in range(0, len(self.val_chats), self.batch_size)
        )
