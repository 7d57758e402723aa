"""The pre-training DataModule: a packed TC/EN token mix for training, bits-per-character windows for
validation.

Validation batches are cut into the evaluator's scoring windows (``bailong.data.windows``) and carry
``labels`` (-100 where not scored) plus ``chars``/``bytes``, so summing ``score_batch`` bits and
``chars`` over a validation loader gives exactly ``bits_per_char`` of ``val_texts``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from bailong.data.config import DataConfig, expect_config
from bailong.data.packing import (
    EpochShuffleSampler,
    MixPlan,
    PackedSequenceDataset,
    pack_mixture,
    special_token_ids,
    tokenize_documents,
)
from bailong.data.splits import Splits, cap_chars, load_splits
from bailong.data.windows import ScoringWindow, collate_windows, scoring_windows

log = logging.getLogger(__name__)


class PretrainDataModule(pl.LightningDataModule):
    """Training: rows of ``seq_len`` packed tokens (``input_ids``, ``labels`` = input_ids), a share
    ``tc_ratio`` of them TC, in an order fixed by ``seed`` and the epoch. Validation: one loader per
    language in ``val_names`` order (``tc`` first), scoring-window batches.

    ``max_val_chars`` keeps the first documents of each validation list up to that many characters.
    """

    val_names = ("tc", "en")

    def __init__(
        self,
        tokenizer: Any,
        tc_train: Sequence[str],
        en_train: Sequence[str],
        tc_val: Sequence[str],
        en_val: Sequence[str],
        *,
        seq_len: int,
        batch_size: int,
        tc_ratio: float,
        seed: int,
        num_workers: int = 0,
        max_val_chars: int | None = None,
        eval_stride: int | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= tc_ratio <= 1.0:
            raise ValueError(f"tc_ratio must be in [0, 1], got {tc_ratio}")
        if max_val_chars is not None and max_val_chars < 1:
            raise ValueError(f"max_val_chars must be positive or None, got {max_val_chars}")
        special_token_ids(tokenizer)  # fail now, not in setup(), if BOS/EOS are missing
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.tc_ratio, self.seed = seq_len, batch_size, tc_ratio, seed
        self.num_workers, self.eval_stride = num_workers, eval_stride
        self.train_texts = {"tc": list(tc_train), "en": list(en_train)}
        self.val_texts = {"tc": cap_chars(list(tc_val), max_val_chars), "en": cap_chars(list(en_val), max_val_chars)}
        for name, texts in self.val_texts.items():
            if not texts:
                raise ValueError(f"no {name} validation documents: val/{name}_bpc needs held-out {name} text")
        self._sequences: torch.Tensor | None = None
        self._mix: MixPlan | None = None
        self._val_windows: dict[str, list[ScoringWindow]] | None = None

    @classmethod
    def from_config(
        cls, tokenizer: Any, data: DataConfig, *, seed: int, splits: Splits | None = None
    ) -> PretrainDataModule:
        """The data module of a ``conf/data`` config, on ``splits`` (default: its corpora loaded and split as the
        pipeline does, ``load_splits``: split per file, validation capped at ``max_val_chars`` per language)."""
        expect_config(data, DataConfig, "PretrainDataModule.from_config(data)")
        s = splits if splits is not None else load_splits(data)
        return cls(
            tokenizer,
            s.tc_train,
            s.en_train,
            s.tc_val,
            s.en_val,
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            tc_ratio=data.tc_ratio,
            seed=seed,
            num_workers=data.num_workers,
        )

    # -- building (lazy, once) ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._build_train()
        if stage in (None, "fit", "validate"):
            self._build_val()

    def _build_train(self) -> None:
        if self._sequences is not None:
            return
        bos, eos = special_token_ids(self.tokenizer)
        tc_docs = tokenize_documents(self.tokenizer, self.train_texts["tc"]) if self.tc_ratio > 0 else []
        en_docs = tokenize_documents(self.tokenizer, self.train_texts["en"]) if self.tc_ratio < 1 else []
        self._sequences, self._mix = pack_mixture(
            tc_docs, en_docs, seq_len=self.seq_len, tc_ratio=self.tc_ratio, seed=self.seed, bos_id=bos, eos_id=eos
        )
        if len(self._sequences) < self.batch_size:
            raise ValueError(
                f"training text packs into {len(self._sequences)} sequences of {self.seq_len} tokens, "
                f"fewer than one batch of {self.batch_size}: add text or lower data.batch_size/seq_len"
            )
        m = self._mix
        log.info(
            "packed %d sequences x %d tokens: TC share %.3f (target %.3f), TC corpus used %.2fx, EN %.2fx",
            len(self._sequences),
            self.seq_len,
            m.tc_share,
            self.tc_ratio,
            m.tc_passes,
            m.en_passes,
        )

    def _build_val(self) -> None:
        if self._val_windows is None:
            self._val_windows = {
                name: scoring_windows(self.tokenizer, texts, seq_len=self.seq_len, stride=self.eval_stride)
                for name, texts in self.val_texts.items()
            }

    # -- what a run reports ---------------------------------------------------------------------------
    @property
    def mix(self) -> MixPlan:
        """The epoch's document plan and its token counts (``tc_share``, ``tc_passes``, ...)."""
        self._build_train()
        return self._mix

    @property
    def train_sequences(self) -> torch.Tensor:
        self._build_train()
        return self._sequences

    @property
    def train_batches_per_epoch(self) -> int:
        return len(self.train_sequences) // self.batch_size  # drop_last: every step sees a full batch

    @property
    def train_tokens_per_epoch(self) -> int:
        """Tokens the training loader yields per epoch (one process; full batches only)."""
        return self.train_batches_per_epoch * self.batch_size * self.seq_len

    @property
    def val_chars(self) -> dict[str, int]:
        """Characters scored per validation language: the denominators of ``val/<name>_bpc``."""
        self._build_val()
        return {name: sum(w.n_chars for w in windows) for name, windows in self._val_windows.items()}

    # -- loaders ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        sequences = self.train_sequences
        return DataLoader(
            PackedSequenceDataset(sequences),
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(sequences), self.seed, start=self._resume_start()),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator must not draw from the global RNG that LoRA
            # dropout uses, or a resumed run's dropout masks would shift by one draw
            generator=torch.Generator().manual_seed(self.seed),
        )

    # Mid-epoch resume: Lightning restores this state before it asks for the train loader, so a
    # resumed run skips exactly the batches the interrupted run had consumed in that epoch.
    def state_dict(self) -> dict:
        return {"consumed_batches": self.trainer.global_step * self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state: dict) -> None:
        self._consumed_batches = int(state.get("consumed_batches", 0))

    def _resume_start(self) -> int:
        consumed = getattr(self, "_consumed_batches", 0)
        self._consumed_batches = 0
        return (consumed % self.train_batches_per_epoch) * self.batch_size

    def val_dataloader(self) -> list[DataLoader]:
        self._build_val()
        return [
            DataLoader(
                self._val_windows[name],
                batch_size=self.batch_size,
                shuffle=False,
                collate_fn=collate_windows,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(self.seed),
            )
            for name in self.val_names
        ]
