"""Load text corpora (local .txt/.jsonl, optionally .gz, or Hugging Face hub data sets) as documents.

A *document* is the unit of splitting and packing: one JSON line's text field, one blank-line
separated block of a .txt file, or one record of a hub data set.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bailong.data.config import CorpusConfig, expect_config

if TYPE_CHECKING:
    from bailong.data.dedup import Deduplicator


class CorpusError(ValueError):
    """Bad corpus input: the message names the file, the line and what was expected."""


def _format_of(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise CorpusError(
        f"{path}: cannot tell the corpus format from the file name; expected .txt, .jsonl "
        "(optionally .gz) or set format: hub for a Hugging Face data set"
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line); non-UTF-8 bytes fail with file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(
                        f"{path}:{lineno}: bytes are not valid UTF-8 "
                        f"(at byte {err.start} of the line: {raw[err.start : err.start + 4]!r})"
                    ) from None
    except (OSError, EOFError) as err:
        if isinstance(err, (gzip.BadGzipFile, EOFError)):
            raise CorpusError(f"{path}: not a valid gzip file ({err})") from None
        raise


def read_jsonl(path: str | Path, error: type[ValueError] = CorpusError) -> Iterator[tuple[str, dict]]:
    """``("file:line", object)`` for each non-blank line of a JSON Lines file (optionally .gz).

    A line that is not valid UTF-8, not valid JSON or not a JSON object raises ``error`` naming the file
    and the line; every JSONL reader of the project (corpora, chats, MC items, bench prompts) goes through here.
    """
    path = Path(path)
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def write_jsonl(records: Iterable[Mapping], path: str | Path) -> Path:
    """One JSON object per line, UTF-8 as is (Chinese stays readable); the reverse of ``read_jsonl``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def _jsonl_records(path: Path, text_field: str) -> Iterator[tuple[str, str, dict]]:
    for where, record in read_jsonl(path):
        text = record.get(text_field)
        if not isinstance(text, str):
            found = ", ".join(sorted(record)) or "no keys"
            raise CorpusError(f"{where}: expected a string field {text_field!r} (found: {found})")
        if text.strip():
            yield where, text, record


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _hub_records(spec: CorpusConfig) -> Iterator[tuple[str, str, dict]]:
    import datasets  # imported lazily: only hub corpora need it

    path, text_field = spec.path, spec.text_field
    ds = datasets.load_dataset(
        path,
        spec.name,
        split=spec.split,
        data_files=spec.data_files,
        revision=spec.revision,
        streaming=spec.streaming,
    )
    for i, record in enumerate(ds):
        where = f"hub data set {path!r} record {i}"
        text = record.get(text_field)
        if not isinstance(text, str):
            raise CorpusError(f"{where}: expected a string field {text_field!r} (found: {', '.join(sorted(record))})")
        if text.strip():
            yield where, text, record


def iter_documents(spec: CorpusConfig) -> Iterator[str]:
    """Yield the documents of one corpus (``max_docs``, ``convert`` apply in ``load_documents``)."""
    expect_config(spec, CorpusConfig, "iter_documents(spec)")
    yield from _documents(spec)


def _records(spec: CorpusConfig) -> Iterator[tuple[str, str, dict | None]]:
    """``(where, text, record)`` per non-blank document (``record``: the JSON object; None for plain text)."""
    path = str(spec.path)  # str(): a pathlib.Path put in by Python code reads the same
    fmt = _format_of(path, spec.format)
    if fmt == "hub":
        yield from _hub_records(spec)
        return
    file = Path(path)
    if not file.is_file():
        raise CorpusError(f"{file}: corpus file not found")
    if fmt == "jsonl":
        yield from _jsonl_records(file, spec.text_field)
    elif fmt == "txt":
        for n, text in enumerate(_txt_documents(file)):
            yield f"{file}: document {n + 1}", text, None
    else:
        raise CorpusError(f"{file}: unknown corpus format {fmt!r}; expected txt, jsonl or hub")


def _documents(spec: CorpusConfig) -> Iterator[str]:
    for _, text, _ in _records(spec):
        yield text


def keyed_documents(spec: CorpusConfig) -> Iterator[tuple[str, str | None]]:
    """``(text, group key)`` per document: the key is the JSON of the ``group_by`` fields' values, the same for
    documents that must share a split (None without ``group_by``: the split follows the text)."""
    for where, text, record in _records(spec):
        if not spec.group_by:
            yield text, None
            continue
        if record is None:
            raise CorpusError(f"{where}: group_by={list(spec.group_by)} needs fields: a jsonl or hub corpus")
        if not any(f in record for f in spec.group_by):  # a misspelt field, or the wrong corpus
            found = ", ".join(sorted(record))
            raise CorpusError(f"{where}: none of the group_by fields {list(spec.group_by)} (found: {found})")
        # a record without some of the fields groups by the others (an untitled poem: by its author)
        yield text, json.dumps([record.get(f) for f in spec.group_by], ensure_ascii=False)


def load_documents(specs: Sequence[CorpusConfig], dedup: Deduplicator | None = None) -> list[str]:
    """All documents of a list of corpora, in order, each capped at its ``max_docs``.

    A spec's ``convert`` (an OpenCC configuration such as ``s2twp``) rewrites each document first; then
    ``dedup`` (a ``bailong.data.dedup.Deduplicator``, shared across calls) drops copies of documents it
    has already seen. ``max_docs`` counts the documents kept, so a streamed corpus reads on past duplicates.
    """
    if isinstance(specs, (CorpusConfig, Mapping, str)) or not isinstance(specs, Sequence):
        raise TypeError(f"load_documents(specs): expected a list of CorpusConfig, got {type(specs).__name__}")
    for i, spec in enumerate(specs):
        expect_config(spec, CorpusConfig, f"load_documents(specs[{i}])")
    docs: list[str] = []
    for spec in specs:
        limit = spec.max_docs
        convert = _converter(spec)
        n = 0
        for doc in _documents(spec):
            if limit is not None and n >= limit:
                break
            if convert is not None:
                doc = convert(doc)
            if dedup is not None and not dedup.keep(doc):
                continue
            docs.append(doc)
            n += 1
        if n == 0:
            why = " after deduplication" if dedup is not None and dedup.stats.seen else ""
            raise CorpusError(f"{spec.path}: corpus is empty{why} (no non-blank documents)")
    return docs


def _converter(spec: CorpusConfig):
    """OpenCC's converter for the spec's ``convert`` key (None when unset); an unknown name fails here."""
    name = spec.convert
    if not name:
        return None
    import opencc

    try:
        return opencc.OpenCC(str(name)).convert
    except RuntimeError as err:  # "<name>.json not found or not accessible"
        raise CorpusError(
            f"{spec.path}: convert={name!r} is not an OpenCC configuration "
            "(e.g. s2twp: Simplified to Taiwan Traditional with Taiwan phrasing; s2t, t2s, s2tw)"
        ) from err


def _unit_hash(text: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(text: str, seed: int, dev_fraction: float, test_fraction: float) -> str:
    """``train``, ``dev`` or ``test`` by a hash of (seed, text): the same document lands in the same split in every
    run, whatever the corpus order (``dev`` is the hash range ``split_documents`` holds out as validation). ``text``
    is a corpus's ``group_by`` key instead where it has one (bailong/data/prepare.py)."""
    u = _unit_hash(text, seed)
    return "dev" if u < dev_fraction else "test" if u < dev_fraction + test_fraction else "train"


def split_keys(keys: Sequence[str], seed: int, dev_fraction: float, test_fraction: float) -> list[str]:
    """``train``, ``dev`` or ``test`` per key by ``split_of``, with the prepare stage's rule for a tiny corpus: when no
    key falls in ``dev`` and there are two or more, the train key with the smallest hash is held out as ``dev``.
    What a corpus outside the prepare stage (chat files) is split by, so it has the same three splits."""
    splits = [split_of(k, seed, dev_fraction, test_fraction) for k in keys]
    train = [i for i, s in enumerate(splits) if s == "train"]
    if dev_fraction > 0 and "dev" not in splits and len(keys) > 1 and train:
        splits[min(train, key=lambda i: _unit_hash(keys[i], seed))] = "dev"
    return splits


def split_documents(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic two-way train/validation split by document.

    Each document goes to validation when a hash of (seed, text) falls below ``val_fraction``, so the
    split does not depend on corpus order and identical documents never straddle the split. No stage splits with
    it: they read the prepare stage's three-way split (``bailong.data.prepare``; chat files ``split_keys``), whose
    ``train`` excludes the ``test`` range and near-duplicates of held-out documents that this ``train`` keeps.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    scores = [_unit_hash(d, seed) for d in docs]
    train = [d for d, s in zip(docs, scores) if s >= val_fraction]
    val = [d for d, s in zip(docs, scores) if s < val_fraction]
    if val_fraction > 0 and not val and len(docs) > 1:
        # tiny corpora: still hold out the one document with the smallest hash
        i = min(range(len(docs)), key=scores.__getitem__)
        val = [docs[i]]
        train = [d for d, s in zip(docs, scores) if s != scores[i] or d != docs[i]]
    return train, val
