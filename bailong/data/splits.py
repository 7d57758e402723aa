"""The corpora of one experiment, split once into train and validation text per language."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bailong.data.config import CorpusConfig, DataConfig, expect_config
from bailong.data.corpus import load_documents, split_documents
from bailong.data.dedup import make_deduplicator


@dataclass
class Splits:
    tc_train: list[str]
    tc_val: list[str]
    en_train: list[str]
    en_val: list[str]

    def val(self) -> dict[str, list[str]]:
        return {"tc": self.tc_val, "en": self.en_val}


def cap_chars(docs: list[str], max_chars: int | None) -> list[str]:
    """The first documents up to ``max_chars`` characters (at least one): a fixed, cheap eval set."""
    if max_chars is None:
        return docs
    kept, total = [], 0
    for doc in docs:
        if kept and total + len(doc) > max_chars:
            break
        kept.append(doc)
        total += len(doc)
    return kept


def _split_each(specs: Sequence[CorpusConfig], data: DataConfig) -> tuple[list[str], list[str]]:
    train, val = [], []
    share = None if data.max_val_chars is None else max(1, data.max_val_chars // max(1, len(specs)))
    dedup = make_deduplicator(data.dedup)  # one per language: a copy in another corpus is a copy too
    for spec in specs:  # per file, so every corpus has its share of the validation text
        t, v = split_documents(load_documents([spec], dedup), data.val_fraction, data.split_seed)
        train += t
        val += cap_chars(v, share)
    return train, val


def load_splits(data: DataConfig) -> Splits:
    """Load TC and EN corpora and split them by document (deterministic, by hash of the text)."""
    expect_config(data, DataConfig, "load_splits(data)")
    tc_train, tc_val = _split_each(data.tc, data)
    en_train, en_val = _split_each(data.en, data)
    return Splits(tc_train, tc_val, en_train, en_val)
