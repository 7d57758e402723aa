"""The data's configuration: corpora, their split, deduplication, the chat data (``data``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class CorpusConfig:
    path: str = MISSING
    format: str | None = None  # txt | jsonl | hub (default: from the file name)
    text_field: str = "text"
    name: str | None = None  # hub: data set configuration
    split: str = "train"  # hub: split to read
    data_files: Any | None = None  # hub: e.g. the "json" builder on local files
    revision: str | None = None
    streaming: bool = False
    max_docs: int | None = None  # documents kept (after conversion and deduplication)
    convert: str | None = None  # OpenCC conversion per document, e.g. s2twp (Simplified -> Taiwan Traditional)


@dataclass
class DedupConfig:
    """Document-level dedup per language, across its corpora, before the split (bailong/data/dedup.py)."""

    exact: bool = True  # hash of the normalised text
    near: float | None = 0.8  # MinHash LSH Jaccard threshold over character shingles; null: exact only
    num_perm: int = 128
    ngram: int = 5  # characters per shingle


@dataclass
class ChatCorpusConfig:
    """One chat corpus: JSON Lines of {"messages": [{"role", "content"}]} or a hub data set in that format."""

    path: str = MISSING
    format: str | None = None  # jsonl | hub (default: from the file name)
    messages_field: str = "messages"
    name: str | None = None  # hub: data set configuration
    split: str = "train"
    data_files: Any | None = None
    revision: str | None = None
    streaming: bool = False
    max_records: int | None = None


@dataclass
class InstructConfig:
    """The instruction set generated from the Tang poems (bailong/data/instruct.py)."""

    poems: str = "${paths.data_dir}/zh_tw/poetry_tang.jsonl.gz"
    max_train: int | None = None  # conversations (at most one per poem)
    max_val: int | None = 64
    en_share: float = 0.4  # conversations asked in English
    multi_turn_share: float = 0.3
    system_share: float = 0.2
    seed: int = 0


@dataclass
class ChatDataConfig:
    instruct: InstructConfig | None = None  # generated Tang-poem set (null: none)
    files: list[ChatCorpusConfig] = field(default_factory=list)  # chat corpora, split by data.val_fraction
    max_val: int = 64  # held-out conversations per source scored as val/chat_bpc
    packing: bool = True  # whole conversations packed into data.seq_len rows (block-diagonal attention)


@dataclass
class DataConfig:
    tc: list[CorpusConfig] = field(default_factory=list)
    en: list[CorpusConfig] = field(default_factory=list)
    tc_ratio: float = 0.8  # share of training tokens that are Traditional Chinese
    val_fraction: float = 0.02
    split_seed: int = 0
    seq_len: int = 256
    batch_size: int = 8
    num_workers: int = 0
    max_val_chars: int | None = 20000  # per language, so evaluation takes seconds on a CPU
    # off by default (the shipped data pack is clean); hub corpora turn it on: {exact: true, near: 0.8}
    dedup: DedupConfig = field(default_factory=lambda: DedupConfig(exact=False, near=None))
    chat: ChatDataConfig | None = None  # SFT stage: the chat data (conf/data/sft_chat.yaml)
