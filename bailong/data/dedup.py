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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text two copies of one document share: NFKC (full-width → ASCII), case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


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
    """Stateful filter: ``keep(doc)`` is True for the first copy of a document, False for later copies."""

    exact: bool = True
    near: float | None = 0.8  # Jaccard threshold of a near duplicate; None: exact only
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    stats: DedupStats = field(default_factory=DedupStats)

    def __post_init__(self) -> None:
        if self.near is not None and not 0.0 < self.near <= 1.0:
            raise ValueError(f"data.dedup.near={self.near}: a Jaccard threshold in (0, 1], or null for exact only")
        if self.num_perm < 16:
            raise ValueError(f"data.dedup.num_perm={self.num_perm}: use at least 16 permutations (128 is usual)")
        if self.ngram < 1:
            raise ValueError(f"data.dedup.ngram={self.ngram}: must be a positive number of characters")
        self._hashes: set[bytes] = set()
        self._lsh = None
        if self.near is not None:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=self.near, num_perm=self.num_perm)

    def minhash(self, text: str):
        return self._minhash(normalise(text))

    def _minhash(self, normalised: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(_shingles(normalised, self.ngram)))
        return m

    def keep(self, text: str) -> bool:
        self.stats.seen += 1
        t = normalise(text)  # once: both checks compare normalised text
        if self.exact:
            digest = hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()
            if digest in self._hashes:
                self.stats.exact += 1
                return False
            self._hashes.add(digest)
        if self._lsh is not None:
            m = self._minhash(t)
            if self._lsh.query(m):
                self.stats.near += 1
                return False
            self._lsh.insert(str(self.stats.seen), m)
        return True

    def filter(self, docs: Iterable[str]) -> Iterator[str]:
        return (d for d in docs if self.keep(d))


def make_deduplicator(cfg: Any) -> Deduplicator | None:
    """A Deduplicator for a ``data.dedup`` node ({exact, near, num_perm, ngram}); None when both are off."""
    if cfg is None:
        return None
    get = cfg.get if isinstance(cfg, Mapping) or hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    exact, near = bool(get("exact", True)), get("near", None)
    if not exact and near is None:
        return None
    return Deduplicator(exact=exact, near=near, num_perm=int(get("num_perm", 128)), ngram=int(get("ngram", 5)))


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """The exact Jaccard similarity MinHash estimates (for tests and for choosing ``near``)."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb)
