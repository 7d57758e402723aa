"""What a split leaves between training and held-out text: ``python -m bailong.data.report [overrides]``.

Per language, corpus and split (JSON): documents, characters, dedup removals and, for ``dev`` and ``test``,

- ``near_duplicate_pairs``: pairs of a training document and a held-out document whose Jaccard similarity of
  character ``ngram``-shingles (the dedup's shingles, of normalised text) reaches ``jaccard`` (0.5 by default,
  below the dedup's removal threshold: variants of one poem, a page and its edited mirror). Candidates come from
  a MinHash LSH index of the held-out documents, banded (42 bands of 3 hashes) so that a pair at 0.5 is missed
  with probability 0.4% and one at 0.6 with 4e-5; each candidate's Jaccard is then computed exactly from the
  shingle sets, so a counted pair is never an estimate;
- ``span<N>_share``: the share of held-out characters that lie inside an ``N``-character span (24 by default)
  found verbatim in the training text (raw text: quotations, set phrases and boilerplate count too, which is
  why the EN share is never 0).

The held-out side is small (a few % of the text) and held in memory; the training side streams from the prepared
shards, so the report runs on any corpus the prepare stage has written (it prepares it first if needed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from bailong.data.config import DataConfig, expect_config
from bailong.data.dedup import _shingles, normalise
from bailong.data.prepare import LANGUAGES, PreparedText, prepare_text

HELD_OUT = ("dev", "test")
BANDS, ROWS = 42, 3  # LSH banding for the candidate pairs (see the module docstring)


@dataclass
class HeldOut:
    """One language's held-out documents with what the report finds about each."""

    texts: list[str] = field(default_factory=list)
    where: list[tuple[int, str]] = field(default_factory=list)  # (corpus index, split)
    pairs: list[int] = field(default_factory=list)  # training documents within the Jaccard threshold
    covered: list[bytearray] = field(default_factory=list)  # 1 per character inside a shared span


def _held_out(prepared: PreparedText, lang: str) -> HeldOut:
    held = HeldOut()
    for split in HELD_OUT:
        for source, texts in enumerate(prepared.documents_by_source(lang, split)):
            for text in texts:
                held.texts.append(text)
                held.where.append((source, split))
                held.pairs.append(0)
                held.covered.append(bytearray(len(text)))
    return held


def count_near_duplicate_pairs(train: Iterable[str], held: HeldOut, jaccard: float, ngram: int) -> None:
    """``held.pairs[i]``: training documents whose shingle Jaccard with held-out document ``i`` is >= ``jaccard``."""
    from datasketch import MinHash, MinHashLSH

    def minhash(shingles: set[bytes]) -> MinHash:
        m = MinHash(num_perm=BANDS * ROWS, seed=1)
        m.update_batch(list(shingles))
        return m

    index = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    held_shingles = [_shingles(normalise(t), ngram) for t in held.texts]
    for i, shingles in enumerate(held_shingles):
        index.insert(i, minhash(shingles))
    for text in train:
        shingles = _shingles(normalise(text), ngram)
        for i in index.query(minhash(shingles)):
            other = held_shingles[i]
            if len(shingles & other) >= jaccard * len(shingles | other):
                held.pairs[i] += 1


def mark_shared_spans(train: Iterable[str], held: HeldOut, span: int) -> None:
    """``held.covered[i][c] = 1`` for each character ``c`` of held-out document ``i`` inside a ``span``-character
    window that also occurs in the training text."""
    windows: dict[str, list[tuple[int, int]]] = {}
    for i, text in enumerate(held.texts):
        for start in range(len(text) - span + 1):
            windows.setdefault(text[start : start + span], []).append((i, start))
    found: set[str] = set()
    for text in train:
        for start in range(len(text) - span + 1):
            window = text[start : start + span]
            if window in windows:
                found.add(window)
    for window in found:
        for i, start in windows[window]:
            held.covered[i][start : start + span] = b"\x01" * span


def _summary(held: HeldOut, keep, span: int) -> dict:
    chosen = [i for i, where in enumerate(held.where) if keep(where)]
    chars = sum(len(held.texts[i]) for i in chosen)
    covered = sum(sum(held.covered[i]) for i in chosen)
    return {
        "documents": len(chosen),
        "characters": chars,
        "near_duplicate_pairs": sum(held.pairs[i] for i in chosen),
        "documents_with_a_near_duplicate_in_train": sum(held.pairs[i] > 0 for i in chosen),
        f"span{span}_share": covered / chars if chars else 0.0,
    }


def split_report(data: DataConfig, cache_dir, *, jaccard: float = 0.5, span: int = 24) -> dict:
    """The report for ``data`` as prepared under ``cache_dir`` (prepared first if it is not cached yet)."""
    expect_config(data, DataConfig, "split_report(data)")
    if not 0 < jaccard <= 1 or span < 1:
        raise ValueError(f"split_report: jaccard={jaccard} must be in (0, 1] and span={span} >= 1")
    prepared = prepare_text(data, cache_dir)
    inputs = prepared.manifest["inputs"]
    report: dict = {
        "prepared_text": str(prepared.root),
        "split_seed": inputs["split_seed"],
        "dev_fraction": inputs["dev_fraction"],
        "test_fraction": inputs["test_fraction"],
        "dedup": inputs["dedup"],
        "jaccard": jaccard,
        "span": span,
        "ngram": data.dedup.ngram,
    }
    for lang in LANGUAGES:
        if lang not in prepared.manifest["languages"]:
            continue
        held = _held_out(prepared, lang)
        count_near_duplicate_pairs(prepared.documents(lang, "train"), held, jaccard, data.dedup.ngram)
        mark_shared_spans(prepared.documents(lang, "train"), held, span)
        sources = []
        for i, src in enumerate(prepared.manifest["languages"][lang]["sources"]):
            entry = {k: src[k] for k in ("path", "read", "kept", "dedup_exact", "dedup_near", "grouped", "bridged")}
            entry["train"] = {"documents": src["docs"]["train"], "characters": src["chars"]["train"]}
            for split in HELD_OUT:
                entry[split] = _summary(held, lambda where, i=i, split=split: where == (i, split), span)
            sources.append(entry)
        report[lang] = {
            "sources": sources,
            "train": {
                "documents": sum(s["train"]["documents"] for s in sources),
                "characters": sum(s["train"]["characters"] for s in sources),
            },
            **{split: _summary(held, lambda where, split=split: where[1] == split, span) for split in HELD_OUT},
        }
    return report
