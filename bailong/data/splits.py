"""The corpora of one experiment, prepared once (``bailong.data.prepare``: converted, deduplicated, split into
train/dev/test) and read back per language: validation text is the dev split, capped per corpus."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from bailong.cache import default_cache_dir
from bailong.data.config import DataConfig, expect_config
from bailong.data.prepare import PreparedText, prepare_text
from bailong.errors import ConfigError


@dataclass
class Splits:
    """What a run reads of its prepared text: the TC training text the tokenizer and the init strategies' corpus
    passes learn from (every document, or a seeded sample of ``data.tc_sample_docs``), dev (``*_val``) and test
    text capped at ``max_val_chars``; training itself streams every training document from ``prepared``."""

    tc_train: list[str]
    tc_val: list[str]
    en_val: list[str]
    tc_test: list[str]
    en_test: list[str]
    prepared: PreparedText
    tc_train_seen: int = 0  # TC training documents the sample was drawn from

    def val(self) -> dict[str, list[str]]:
        return {"tc": self.tc_val, "en": self.en_val}

    def held_out(self) -> dict[str, list[str]]:
        """Dev and test text by evaluation name: ``tc``, ``en`` (dev: every choice) and ``test_tc``, ``test_en``
        (test: the reported figures), so a run's ``<model>/tc_bpc`` is dev and ``<model>/test_tc_bpc`` test. A
        language with no test text (``data.test_fraction=0``) has no test name."""
        test = {f"test_{lang}": docs for lang, docs in (("tc", self.tc_test), ("en", self.en_test)) if docs}
        return {**self.val(), **test}

    def train_documents(self, lang: str) -> Iterator[str]:
        """Every training document of ``lang``, streamed from disk in corpus order."""
        if lang not in self.prepared.manifest["languages"]:
            return iter(())
        return self.prepared.documents(lang, "train")


def sample_documents(docs: Iterable[str], k: int | None, seed: int) -> tuple[list[str], int]:
    """``(sample, seen)``: every document when ``k`` is None, else a uniform sample of ``k`` drawn in one pass with
    a seeded reservoir (memory: the sample), returned in corpus order."""
    if k is None:
        kept = list(docs)
        return kept, len(kept)
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for i, doc in enumerate(docs):
        seen = i + 1
        if i < k:
            reservoir.append((i, doc))
        else:
            j = int(rng.integers(0, i + 1))
            if j < k:
                reservoir[j] = (i, doc)
    return [doc for _, doc in sorted(reservoir)], seen


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    return os.path.isfile(a) and os.path.isfile(b) and os.path.samefile(a, b)


def corpus_index(data: DataConfig, lang: str, path: str | os.PathLike, key: str) -> int:
    """The index in ``data.<lang>`` of the corpus read from ``path`` (the same string, or the same local file): how a
    stage that makes something of held-out or training text (multiple-choice items, the SFT instruction set) finds
    that text in the prepared split, ``PreparedText.documents_by_source(lang, split)[index]``. A path that is no
    corpus of ``data.<lang>`` is a ``ConfigError`` naming ``key``: its documents were never split."""
    path = str(path)
    for i, spec in enumerate(getattr(data, lang)):
        if _same_path(path, str(spec.path)):
            return i
    listed = ", ".join(str(spec.path) for spec in getattr(data, lang)) or "none"
    raise ConfigError(
        f"{key}: path={path} is not a corpus of data.{lang} (its paths: {listed}); expected one of them: only the "
        "data config's corpora are split into train/dev/test, so only their held-out documents are known"
    )


def cap_chars(docs: Iterable[str], max_chars: int | None) -> list[str]:
    """The first documents up to ``max_chars`` characters (at least one): a fixed, cheap eval set."""
    if max_chars is None:
        return list(docs)
    kept, total = [], 0
    for doc in docs:
        if kept and total + len(doc) > max_chars:
            break
        kept.append(doc)
        total += len(doc)
    return kept


def _held_out(text: PreparedText, lang: str, split: str, data: DataConfig) -> list[str]:
    sources = text.documents_by_source(lang, split)  # per corpus, so every corpus has its share
    share = None if data.max_val_chars is None else max(1, data.max_val_chars // max(1, len(sources)))
    return [doc for docs in sources for doc in cap_chars(docs, share)]


def load_splits(data: DataConfig, cache_dir: str | os.PathLike | None = None) -> Splits:
    """TC and EN text prepared (cached under ``cache_dir``, default the project's) and read back: the TC training
    text (or its sample), and dev/test capped at ``max_val_chars`` per language."""
    expect_config(data, DataConfig, "load_splits(data)")
    text = prepare_text(data, cache_dir if cache_dir is not None else default_cache_dir())
    langs = text.manifest["languages"]

    def held(lang: str, split: str) -> list[str]:
        return _held_out(text, lang, split, data) if lang in langs else []

    tc_docs = text.documents("tc", "train") if "tc" in langs else iter(())
    tc_train, seen = sample_documents(tc_docs, data.tc_sample_docs, data.split_seed)
    return Splits(
        tc_train=tc_train,
        tc_val=held("tc", "dev"),
        en_val=held("en", "dev"),
        tc_test=held("tc", "test"),
        en_test=held("en", "test"),
        prepared=text,
        tc_train_seen=seen,
    )
