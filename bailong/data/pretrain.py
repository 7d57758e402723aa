"""The pre-training DataModule: packed TC/EN token shards streamed for training, bits-per-character windows for
validation.

Training text goes through the prepare stage's token step (``bailong.data.prepare.prepare_tokens``: tokenized
once into cached ``.npy`` shards) and is read as ``bailong.data.shards`` streams it: the TC/EN mix holds in every
batch, each rank reads its share, and a resumed run continues at the sample it stopped at.

Validation batches are cut into the evaluator's scoring windows (``bailong.data.windows``) and carry
``labels`` (-100 where not scored) plus ``chars``/``bytes``, so summing ``score_batch`` bits and
``chars`` over a validation loader gives exactly ``bits_per_char`` of ``val_texts``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from bailong.cache import default_cache_dir
from bailong.data.config import DataConfig, PrepareConfig, expect_config
from bailong.data.packing import special_token_ids
from bailong.data.prepare import PreparedText, prepare_tokens, texts_key
from bailong.data.shards import MixedStream, StreamMix, StreamSampler
from bailong.data.splits import Splits, cap_chars, load_splits
from bailong.data.windows import ScoringWindow, collate_windows, scoring_windows

log = logging.getLogger(__name__)


class PretrainDataModule(pl.LightningDataModule):
    """Training: rows of ``seq_len`` packed tokens (``input_ids``, ``labels`` = input_ids) from the token shards,
    ``tc_ratio`` of every batch TC (up to one row), in an order fixed by ``seed`` (``bailong.data.shards``); under
    DDP each rank reads its own share. Validation: one loader per language in ``val_names`` order (``tc`` first),
    scoring-window batches.

    ``max_val_chars`` keeps the first documents of each validation list up to that many characters.
    """

    val_names = ("tc", "en")

    def __init__(
        self,
        tokenizer: Any,
        tc_train: Sequence[str] | PreparedText,
        en_train: Sequence[str] | None,
        tc_val: Sequence[str],
        en_val: Sequence[str],
        *,
        seq_len: int,
        batch_size: int,
        tc_ratio: float,
        seed: int,
        num_workers: int = 0,
        max_val_chars: int | None = None,
        eval_seq_len: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        prepare: PrepareConfig | None = None,
    ) -> None:
        """Training text is ``tc_train``/``en_train`` (lists of documents) or a ``PreparedText`` passed as
        ``tc_train`` (its ``train`` split streamed from disk; ``en_train`` then None). ``eval_seq_len``: positions
        per validation scoring window (the stages pass the model's limit, as the evaluators use; default
        ``seq_len``)."""
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
        self.num_workers = num_workers
        self.eval_seq_len = seq_len if eval_seq_len is None else eval_seq_len
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.prepare = prepare if prepare is not None else PrepareConfig()
        needed = [lang for lang, share in (("tc", tc_ratio), ("en", 1 - tc_ratio)) if share > 0]
        if isinstance(tc_train, PreparedText):
            text = tc_train
            self._train_text: dict[str, Callable[[], Iterator[str]]] = {
                lang: (lambda lang=lang: text.documents(lang, "train")) for lang in needed
            }
            self._text_key = text.root.name
        else:
            lists = {"tc": list(tc_train), "en": list(en_train or [])}
            for lang in needed:
                if not lists[lang]:
                    raise ValueError(
                        f"tc_ratio={tc_ratio} asks for {lang.upper()} tokens but its training corpus is empty"
                    )
            self._train_text = {lang: (lambda docs=lists[lang]: iter(docs)) for lang in needed}
            self._text_key = texts_key({lang: lists[lang] for lang in needed})
        self.val_texts = {"tc": cap_chars(list(tc_val), max_val_chars), "en": cap_chars(list(en_val), max_val_chars)}
        for name, texts in self.val_texts.items():
            if not texts:
                raise ValueError(f"no {name} validation documents: val/{name}_bpc needs held-out {name} text")
        self._stream: MixedStream | None = None
        self._val_windows: dict[str, list[ScoringWindow]] | None = None
        self._consumed_samples = 0

    @classmethod
    def from_config(
        cls,
        tokenizer: Any,
        data: DataConfig,
        *,
        seed: int,
        splits: Splits | None = None,
        cache_dir: str | os.PathLike | None = None,
        eval_seq_len: int | None = None,
    ) -> PretrainDataModule:
        """The data module of a ``conf/data`` config, on ``splits`` (default: its corpora prepared and split as the
        pipeline does, ``load_splits``): training streams every document of the prepared ``train`` split."""
        expect_config(data, DataConfig, "PretrainDataModule.from_config(data)")
        s = splits if splits is not None else load_splits(data, cache_dir)
        return cls(
            tokenizer,
            s.prepared,
            None,
            s.tc_val,
            s.en_val,
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            tc_ratio=data.tc_ratio,
            seed=seed,
            num_workers=data.num_workers,
            eval_seq_len=eval_seq_len,
            cache_dir=cache_dir,
            prepare=data.prepare,
        )

    # -- building (lazy, once) ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._build_train()
        if stage in (None, "fit", "validate"):
            self._build_val()

    def _build_train(self) -> None:
        if self._stream is not None:
            return
        prepared = prepare_tokens(
            self._train_text,
            self.tokenizer,
            seq_len=self.seq_len,
            cache_dir=self.cache_dir,
            text_key=self._text_key,
            workers=self.prepare.workers,
            shard_tokens=self.prepare.shard_tokens,
            batch_docs=self.prepare.batch_docs,
        )
        self._stream = MixedStream(prepared, self.tc_ratio, self.seed)
        if self._stream.samples_per_pass() < self.batch_size:
            raise ValueError(
                f"training text packs into {self._stream.samples_per_pass()} rows of {self.seq_len} tokens per pass, "
                f"fewer than one batch of {self.batch_size}: add text or lower data.batch_size/seq_len"
            )
        m = self.mix
        log.info(
            "streaming %d TC + %d EN rows x %d tokens from %s: TC share %.3f (target %.3f), used TC %.2fx, EN %.2fx",
            m.tc_rows,
            m.en_rows,
            self.seq_len,
            prepared.root,
            m.tc_share,
            self.tc_ratio,
            m.tc_passes,
            m.en_passes,
        )

    def _build_val(self) -> None:
        if self._val_windows is None:
            self._val_windows = {
                name: scoring_windows(self.tokenizer, texts, seq_len=self.eval_seq_len)
                for name, texts in self.val_texts.items()
            }

    # -- what a run reports ---------------------------------------------------------------------------
    @property
    def stream(self) -> MixedStream:
        self._build_train()
        return self._stream

    @property
    def mix(self) -> StreamMix:
        """One pass's rows by language and what they add up to (``tc_share``, ``tc_passes``, ...)."""
        return self.stream.mix()

    @property
    def train_sequences(self) -> torch.Tensor:
        """One pass's rows in the order one process reads them (``[rows, seq_len]`` int32; for small data only)."""
        stream = self.stream
        n = self.train_batches_per_epoch * self.batch_size
        return torch.stack([stream[g]["input_ids"].to(torch.int32) for g in range(n)])

    @property
    def train_batches_per_epoch(self) -> int:
        """Batches each rank's loader yields per epoch: full global batches of ``batch_size`` x ranks rows (the
        attached trainer's world size; one process before ``fit``), as ``StreamSampler`` cuts them."""
        world = self.trainer.world_size if self.trainer is not None else 1
        return max(1, self.stream.samples_per_pass() // (self.batch_size * world))

    @property
    def train_tokens_per_epoch(self) -> int:
        """Tokens one rank's training loader yields per epoch."""
        return self.train_batches_per_epoch * self.batch_size * self.seq_len

    @property
    def val_chars(self) -> dict[str, int]:
        """Characters scored per validation language: the denominators of ``val/<name>_bpc``."""
        self._build_val()
        return {name: sum(w.n_chars for w in windows) for name, windows in self._val_windows.items()}

    # -- loaders ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        start, self._consumed_samples = self._consumed_samples, 0
        return DataLoader(
            self.stream,
            batch_size=self.batch_size,
            sampler=StreamSampler(self.stream, self.batch_size, num_replicas=world, rank=rank, start_sample=start),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator must not draw from the global RNG that LoRA
            # dropout uses, or a resumed run's dropout masks would shift by one draw
            generator=torch.Generator().manual_seed(self.seed),
        )

    # Mid-epoch resume: Lightning restores this state before it asks for the train loader, so a resumed run
    # starts at the global sample the interrupted run stopped at, on any number of ranks.
    def state_dict(self) -> dict:
        t = self.trainer
        return {"consumed_samples": t.global_step * t.accumulate_grad_batches * self.batch_size * t.world_size}

    def load_state_dict(self, state: dict) -> None:
        if "consumed_samples" not in state:
            raise ValueError(
                "this checkpoint's data state has no consumed_samples: it was written before training read prepared "
                "shards, so its data order cannot be continued; start the run afresh"
            )
        self._consumed_samples = int(state["consumed_samples"])

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
