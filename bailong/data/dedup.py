"""Document-level deduplication: exact (hash of normalised text) and near-duplicate (MinHash LSH).

The paper's pre-training text was fuzzily deduplicated; web crawls and Wikipedia dumps repeat pages
(mirrors, templates, the same article in Simplified and Traditional script). Documents stream through a
``Deduplicator`` once, first copy wins:

* exact: BLAKE2b of the NFKC-normalised, case-folded text with whitespace collapsed;
* near: ``datasketch`` MinHash (``num_perm`` permutations) of character ``ngram``-shingles (characters,
  not words: Chinese has no spaces) in a ``MinHashLSH`` index; a document whose estimated Jaccard
  similarity to a kept one reaches ``near`` is dropped. LSH finds candidates in sub-linear time; its
  banding makes the threshold soft (a pair just under it may be caught, one just over it missed).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bailong.data.config import DedupConfig, expect_config

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text two copies of one document share: NFKC (full-width → ASCII), case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def digest(normalised: str) -> bytes:
    """The exact-copy fingerprint: BLAKE2b-128 of the normalised text."""
    return hashlib.blake2b(normalised.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, ngram: int) -> set[bytes]:
    """Character n-grams of the normalised text (the whole text when shorter than ``ngram``)."""
    return _shingles(normalise(text), ngram)


def _shingles(t: str, ngram: int) -> set[bytes]:
    if len(t) <= ngram:
        return {t.encode("utf-8")}
    return {t[i : i + ngram].encode("utf-8") for i in range(len(t) - ngram + 1)}


@dataclass
class DedupStats:
    seen: int = 0
    exact: int = 0
    near: int = 0

    @property
    def kept(self) -> int:
        return self.seen - self.exact - self.near


@dataclass
class Deduplicator:
    """Stateful filter: ``keep(doc)`` is True for the first copy of a document, False for later copies.

    ``cfg`` holds the settings (``DedupConfig`` checked their ranges); ``seed`` seeds MinHash's permutations."""

    cfg: DedupConfig
    seed: int = 1
    stats: DedupStats = field(default_factory=DedupStats)

    def __post_init__(self) -> None:
        expect_config(self.cfg, DedupConfig, "Deduplicator(cfg)")
        self._hashes: set[bytes] = set()
        self._lsh = self._groups = None
        from datasketch import MinHashLSH

        if self.cfg.near is not None:
            self._lsh = MinHashLSH(threshold=self.cfg.near, num_perm=self.cfg.num_perm)
        if self.cfg.group is not None:  # kept documents, keyed "<index>:<split>"
            self._groups = MinHashLSH(threshold=self.cfg.group, num_perm=self.cfg.num_perm)

    def minhash(self, text: str):
        return self._minhash(normalise(text))

    def _minhash(self, normalised: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.num_perm, seed=self.seed)
        m.update_batch(list(_shingles(normalised, self.cfg.ngram)))
        return m

    def keep(self, text: str) -> bool:
        return self.check(*self.fingerprint(text)) is None

    def fingerprint(self, text: str) -> tuple[bytes, np.ndarray | None]:
        """``(digest, MinHash hash values)`` of the normalised text (no MinHash when ``near`` is off): what
        ``check`` compares, computable in another process (bailong/data/prepare.py's workers)."""
        t = normalise(text)  # once: both fingerprints read normalised text
        needs_minhash = self.cfg.near is not None or self.cfg.group is not None
        return digest(t), (self._minhash(t).hashvalues if needs_minhash else None)

    def group_splits(self, minhash_values) -> set[str]:
        """The splits of the kept documents within ``cfg.group`` of this one (empty: none, or no grouping); ``assign``
        records a kept document's split. More than one split: the document bridges them, and no split can take it
        without a near-duplicate across the split."""
        if self._groups is None:
            return set()
        from datasketch import LeanMinHash

        matches = self._groups.query(LeanMinHash(seed=self.seed, hashvalues=minhash_values))
        return {key.partition(":")[2] for key in matches}

    def assign(self, minhash_values, split: str) -> None:
        if self._groups is not None:
            from datasketch import LeanMinHash

            self._groups.insert(f"{self.stats.seen}:{split}", LeanMinHash(seed=self.seed, hashvalues=minhash_values))

    def check(self, text_digest: bytes, minhash_values=None) -> str | None:
        """None for a first copy (recorded as seen), else ``"exact"`` or ``"near"``: the filter on precomputed
        fingerprints (``digest`` of the normalised text, MinHash hash values), which worker processes compute
        while this index stays in one process (bailong/data/prepare.py)."""
        self.stats.seen += 1
        if self.cfg.exact:
            if text_digest in self._hashes:
                self.stats.exact += 1
                return "exact"
            self._hashes.add(text_digest)
        if self._lsh is not None:
            from datasketch import LeanMinHash

            m = LeanMinHash(seed=self.seed, hashvalues=minhash_values)
            if self._lsh.query(m):
                self.stats.near += 1
                return "near"
            self._lsh.insert(str(self.stats.seen), m)
        return None

    def filter(self, docs: Iterable[str]) -> Iterator[str]:
        return (d for d in docs if self.keep(d))


def make_deduplicator(cfg: DedupConfig | None) -> Deduplicator | None:
    """A fresh Deduplicator for ``data.dedup``; None when it is unset or both exact and near are off."""
    if cfg is None:
        return None
    expect_config(cfg, DedupConfig, "make_deduplicator(cfg)")
    if not cfg.exact and cfg.near is None and cfg.group is None:
        return None
    return Deduplicator(cfg)


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """The exact Jaccard similarity MinHash estimates (for tests and for choosing ``near``)."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb)
