"""The prepare stage: corpora → converted, deduplicated, split text shards → tokenized, packed token shards.

    python run.py stage=prepare data=hub_bailong_mix data.prepare.workers=16   # once, before training

Two steps, each cached by a hash of its inputs under ``<cache_dir>/prepared_text/<key>`` and
``<cache_dir>/token_shards/<key>`` (a sweep's jobs and a job's ranks prepare once and read the same files):

1. **text** (``prepare_text``): each language's corpora stream through in order; a pool of worker processes
   converts (OpenCC) and fingerprints each document (normalised-text digest, MinHash); the parent keeps the
   first copy (``bailong.data.dedup``) and sends each document to ``train``, ``dev`` or ``test`` by a hash of
   its text or its ``group_by`` fields (``split_seed``), or to a near-duplicate's split (``data.dedup.group``),
   so a document's split never depends on corpus order or worker count. Text is written as gzipped JSON Lines
   shards; nothing but the dedup index and one shard per split is held in memory. With
   ``data.dedup.engine=datatrove`` there is no index here: every document is written as a candidate and
   datatrove's MinHash stages (``bailong.data.dedup_datatrove``, local or SLURM) remove the copies on disk.
2. **tokens** (``prepare_tokens``): each language's ``train`` text is tokenized by the worker pool with the
   run's (extended) tokenizer, ``BOS + doc + EOS`` concatenated and cut into rows of ``seq_len`` tokens,
   written as ``.npy`` shards of fixed-length rows (``bailong.data.shards`` memory-maps and streams them).

Both steps checkpoint after each shard (shard first, then a state file, each written atomically): killed half way,
a rerun continues after the last whole shard and writes the same bytes an uninterrupted run would. Each finished
directory holds ``manifest.json`` (sources, revisions, counts, split seed, tokenizer hash, every file's
SHA-256); a directory with a manifest is complete. docs/data.md says why ``.npy`` rows rather than LitData.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bailong.cache import cache_key, computed_once, hash_texts
from bailong.data.config import CorpusConfig, DataConfig, expect_config
from bailong.data.corpus import CorpusError, _converter, _unit_hash, keyed_documents, read_jsonl, split_of
from bailong.data.dedup import Deduplicator, make_deduplicator
from bailong.data.packing import special_token_ids, tokenize_documents
from bailong.files import write_atomically, write_json_atomically

log = logging.getLogger(__name__)

LANGUAGES = ("tc", "en")
SPLITS = ("train", "dev", "test")
MANIFEST = "manifest.json"
STATE = "state.pkl"  # the resume point of an unfinished directory; gone once its manifest is written
FORMAT_VERSION = 3  # bumped when the files' layout or content changes: old cache entries are then not reused


# ---------------------------------------------------------------------------------------------------------
# worker pool: order-preserving, inline for one worker


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pool
    _WORKER_STATE.clear()
    _WORKER_STATE.update(state)


def _map_ordered(fn: Callable, batches: Iterable, workers: int, state: dict[str, Any]) -> Iterator:
    """``fn(batch)`` for each batch, in order; ``workers`` processes (forked, each initialised with ``state``),
    or this process alone for one worker. The result never depends on ``workers``. At most two batches per
    worker are in flight (``Pool.imap`` would read its whole input ahead: the whole corpus)."""
    if workers <= 1:
        _init_worker(state)
        try:
            yield from map(fn, batches)
        finally:
            _WORKER_STATE.clear()
        return
    ctx = multiprocessing.get_context("fork")  # no re-import of torch per worker; workers run no torch ops
    with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------------
# step 1: text


@dataclass
class TextFingerprint:
    text: str  # after conversion
    key: str | None  # what decides the split when the corpus has group_by (else the text)
    digest: bytes  # of the normalised text: exact copies
    minhash: np.ndarray | None  # MinHash hash values of its shingles: near copies


def _fingerprint_batch(docs: list[tuple[str, str | None]]) -> list[TextFingerprint]:
    convert = _WORKER_STATE.get("converter")
    fingerprinter: Deduplicator | None = _WORKER_STATE.get("fingerprinter")
    out = []
    for doc, key in docs:
        text = convert(doc) if convert is not None else doc
        if fingerprinter is not None:
            out.append(TextFingerprint(text, key, *fingerprinter.fingerprint(text)))
        else:
            out.append(TextFingerprint(text, key, b"", None))
    return out


def source_record(spec: CorpusConfig) -> dict:
    """What identifies a corpus in a cache key and a manifest: its settings and, for a local file, its file name and
    content hash (a hub data set is named by path, configuration, split and revision). Not a local file's directory:
    the same data in another checkout is the same prepared text, with the same key (the base's card records it)."""
    record = {k: v for k, v in asdict(spec).items() if k != "data_files" or v is not None}
    record["path"] = str(spec.path)
    if spec.format != "hub" and Path(spec.path).is_file():
        record["path"] = Path(spec.path).name
        record["sha256"] = file_sha256(Path(spec.path))
    return record


def _text_inputs(data: DataConfig) -> dict:
    return {
        "format": FORMAT_VERSION,
        "tc": [source_record(s) for s in data.tc],
        "en": [source_record(s) for s in data.en],
        "dedup": asdict(data.dedup) if data.dedup is not None else None,
        "split_seed": data.split_seed,
        "dev_fraction": data.val_fraction,
        "test_fraction": data.test_fraction,
        "shard_docs": data.prepare.shard_docs,
    }


def _write_jsonl_gz(path: Path, texts: Sequence[str]) -> None:
    def write(f: io.BufferedIOBase) -> None:
        # mtime=0: the same texts give the same bytes, so a resumed prepare's hashes equal an uninterrupted one's
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            for text in texts:
                gz.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomically(path, write)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _SourceCounts:
    read: int = 0  # documents streamed from the corpus (the resume point)
    kept: int = 0  # after dedup
    dedup_exact: int = 0
    dedup_near: int = 0
    grouped: int = 0  # documents sent to a near-duplicate's split rather than their own hash's
    bridged: int = 0  # documents dropped as near-duplicates (data.dedup.group) of documents in two different splits
    docs: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # per split
    chars: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def add(self, split: str, text: str, sign: int = 1) -> None:
        self.docs[split] += sign
        self.chars[split] += sign * len(text)


@dataclass
class _TextState:
    """Where one language's text step stands: the resume point, written after each flushed shard."""

    source: int = 0  # index of the corpus being read
    counts: list = field(default_factory=list)  # a _SourceCounts per corpus finished or under way
    dedup: Deduplicator | None = None  # one per language: a copy in another corpus is a copy too
    # this corpus's dev/test documents not yet in a shard (a shard of them is written at data.prepare.shard_docs)
    held: dict = field(default_factory=lambda: {"dev": [], "test": []})
    shards: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # shards written per split, this corpus
    done: bool = False
    # data.dedup.engine=datatrove (bailong/data/dedup_datatrove.py): near-duplicate removal after the text pass
    deduped: bool = False  # the final shards are all written (the candidates and datatrove's files removed)
    filtered: dict = field(default_factory=dict)  # candidate file → documents removed, for files already written


def _save(path: Path, state: Any) -> None:
    write_atomically(path, lambda f: pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL))


def _text_source(
    data: DataConfig, spec: CorpusConfig, state: _TextState, state_path: Path, out: Path, workers: int
) -> None:
    """One corpus of the language: from its resume point to its end, a state save after each shard."""
    shard_docs = data.prepare.shard_docs
    if len(state.counts) <= state.source:
        state.counts.append(_SourceCounts())
    counts: _SourceCounts = state.counts[state.source]
    for split in SPLITS:  # shards written after the last state save: written again below
        for stale in out.glob(f"{split}-*.jsonl.gz"):
            if int(stale.name[len(split) + 1 : -len(".jsonl.gz")]) >= state.shards[split]:
                stale.unlink()
    train: list[str] = []
    texts = {"train": train, **state.held}

    def write(split: str) -> None:
        _write_jsonl_gz(out / f"{split}-{state.shards[split]:05d}.jsonl.gz", texts[split])
        state.shards[split] += 1
        texts[split].clear()

    def flush(finished: bool) -> None:
        for split in SPLITS:  # at the corpus's end every split gets a file, if only an empty one
            if len(texts[split]) >= shard_docs or (finished and (texts[split] or not state.shards[split])):
                write(split)
        if finished:
            state.shards, state.source = dict.fromkeys(SPLITS, 0), state.source + 1
        _save(state_path, state)

    def remaining() -> Iterator[tuple[str, str | None]]:
        for n, doc in enumerate(keyed_documents(spec)):
            if n >= counts.read:  # resumed: the documents before the checkpoint were taken already
                yield doc

    batches = _batched(remaining(), data.prepare.batch_docs)
    # the workers fingerprint with a Deduplicator of the same settings but no index: the index stays here
    fingerprinter = Deduplicator(state.dedup.cfg, state.dedup.seed) if state.dedup is not None else None
    worker_state = {"converter": _converter(spec), "fingerprinter": fingerprinter}
    fingerprints = _map_ordered(_fingerprint_batch, batches, workers, worker_state)
    for fp in (fp for batch in fingerprints for fp in batch):
        if spec.max_docs is not None and counts.kept >= spec.max_docs:
            break
        counts.read += 1
        copy = state.dedup.check(fp.digest, fp.minhash) if state.dedup is not None else None
        if copy is not None:
            setattr(counts, f"dedup_{copy}", getattr(counts, f"dedup_{copy}") + 1)
            continue
        own = split_of(fp.text if fp.key is None else fp.key, data.split_seed, data.val_fraction, data.test_fraction)
        near = state.dedup.group_splits(fp.minhash) if state.dedup is not None else set()
        if len(near) > 1:  # near-duplicate of documents in two splits: any split it joins leaks into another
            counts.bridged += 1
            continue
        counts.kept += 1
        split = near.pop() if near else own
        counts.grouped += split != own
        if state.dedup is not None:
            state.dedup.assign(fp.minhash, split)
        counts.add(split, fp.text)
        texts[split].append(fp.text)
        # the first shard waits (up to 4x) for a dev document: a tiny corpus falls back to its train text
        has_dev = state.held["dev"] or state.shards["dev"]
        train_full = len(train) >= shard_docs and (state.shards["train"] or has_dev or len(train) >= 4 * shard_docs)
        if train_full or max(len(state.held["dev"]), len(state.held["test"])) >= shard_docs:
            flush(False)
    if counts.kept == 0:
        why = " after deduplication" if counts.read else ""
        raise CorpusError(f"{spec.path}: corpus is empty{why} (no non-blank documents)")
    if not state.held["dev"] and not state.shards["dev"] and counts.kept > 1:
        if state.shards["train"]:
            raise CorpusError(f"{spec.path}: no document fell in the dev split; raise data.val_fraction")
        # tiny corpora: still hold out one document, the train document with the smallest hash
        fallback = min(train, key=lambda t: _unit_hash(t, data.split_seed))
        train.remove(fallback)
        state.held["dev"].append(fallback)
        counts.add("train", fallback, -1)
        counts.add("dev", fallback)
    flush(True)


def _text_language(data: DataConfig, lang: str, records: list[dict], root: Path, workers: int) -> dict:
    """One language's corpora in order; its manifest entry: each corpus's record (``records``) and counts."""
    specs: list[CorpusConfig] = getattr(data, lang)
    state_path = root / lang / STATE
    on_disk = data.dedup.engine == "datatrove"
    if state_path.is_file():
        state: _TextState = pickle.loads(state_path.read_bytes())
    else:
        state = _TextState(dedup=None if on_disk else make_deduplicator(data.dedup))
    # the on-disk engine removes near-duplicates after the pass: every converted document is a candidate first
    written = root / lang / "candidates" if on_disk else root / lang
    while not state.done and state.source < len(specs):
        _text_source(data, specs[state.source], state, state_path, written / f"{state.source:03d}", workers)
    state.done = True
    _save(state_path, state)
    if on_disk:
        if not state.deduped:
            _remove_near_duplicates(data, lang, state, state_path, written, root / lang, workers)
        for scratch in (written, root / lang / "minhash"):  # the candidates and datatrove's files
            shutil.rmtree(scratch, ignore_errors=True)
    return {"sources": [{**record, **asdict(c)} for record, c in zip(records, state.counts)]}


def _remove_near_duplicates(
    data: DataConfig, lang: str, state: _TextState, state_path: Path, candidates: Path, out: Path, workers: int
) -> None:
    """``data.dedup.engine=datatrove``: its MinHash stages over the language's candidate shards, then each shard
    written to ``out`` without the removed documents (a state save after each: a rerun continues)."""
    from bailong.data.dedup_datatrove import kept_documents, run_minhash_stages

    files = sorted(candidates.glob("*/*.jsonl.gz"))
    work = out / "minhash"
    removals = run_minhash_stages([str(f) for f in files], work, data.dedup, data.prepare, workers)
    for rank, path in enumerate(files):
        name = str(path.relative_to(candidates))  # <corpus>/<split>-NNNNN.jsonl.gz
        if name in state.filtered:
            continue
        texts = [record["text"] for _, record in read_jsonl(path)]
        kept = kept_documents(texts, rank, removals)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl_gz(out / name, kept)
        counts: _SourceCounts = state.counts[int(path.parent.name)]
        split = path.name.partition("-")[0]
        removed = len(texts) - len(kept)
        counts.kept -= removed
        counts.dedup_near += removed
        counts.docs[split] -= removed
        counts.chars[split] -= sum(map(len, texts)) - sum(map(len, kept))
        state.filtered[name] = removed
        _save(state_path, state)
    if not any(c.docs["dev"] for c in state.counts):
        raise CorpusError(f"data.{lang}: no dev document is left after near-duplicate removal; raise data.val_fraction")
    state.deduped = True
    _save(state_path, state)


@dataclass(frozen=True)
class PreparedText:
    """A finished text directory: per language and split, its shard files in order (``manifest``: what it holds)."""

    root: Path
    manifest: dict

    def files(self, lang: str, split: str) -> list[Path]:
        return [self.root / f for f in self.manifest["files"][lang][split]]

    def documents(self, lang: str, split: str) -> Iterator[str]:
        """The split's documents in corpus order (one corpus after another), streamed from disk."""
        for path in self.files(lang, split):
            for _, record in read_jsonl(path):
                yield record["text"]

    def documents_by_source(self, lang: str, split: str) -> list[Iterator[str]]:
        """One stream per corpus (what a per-corpus cap such as ``max_val_chars`` needs)."""
        n = len(self.manifest["languages"][lang]["sources"])
        return [self._source_docs(lang, split, i) for i in range(n)]

    def _source_docs(self, lang: str, split: str, i: int) -> Iterator[str]:
        for path in self.files(lang, split):
            if path.parent.name == f"{i:03d}":
                for _, record in read_jsonl(path):
                    yield record["text"]


def prepare_text(data: DataConfig, cache_dir: str | os.PathLike, *, workers: int | None = None) -> PreparedText:
    """Step 1 for ``data`` (cached): converted, deduplicated text split into train/dev/test shards per language."""
    expect_config(data, DataConfig, "prepare_text(data)")
    workers = data.prepare.workers if workers is None else workers
    inputs = _text_inputs(data)
    root = Path(cache_dir) / "prepared_text" / cache_key(inputs)
    with computed_once(root):
        if not (root / MANIFEST).is_file():
            log.info("preparing text in %s (%d worker%s)", root, workers, "" if workers == 1 else "s")
            languages = {
                lang: _text_language(data, lang, inputs[lang], root, workers)
                for lang in LANGUAGES
                if getattr(data, lang)
            }
            # <split>-NNNNN.jsonl.gz per corpus folder
            files = {
                lang: {
                    split: sorted(str(p.relative_to(root)) for p in (root / lang).glob(f"*/{split}*.jsonl.gz"))
                    for split in SPLITS
                }
                for lang in languages
            }
            manifest = {
                "inputs": inputs,
                "languages": languages,
                "files": files,
                "sha256": {f: file_sha256(root / f) for lang in files.values() for fs in lang.values() for f in fs},
            }
            write_json_atomically(root / MANIFEST, manifest)
            for lang in languages:
                (root / lang / STATE).unlink(missing_ok=True)
    return PreparedText(root, json.loads((root / MANIFEST).read_text()))


# ---------------------------------------------------------------------------------------------------------
# step 2: tokens


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of the fast tokenizer's full serialisation (vocabulary, merges, normaliser, added tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _tokenize_batch(docs: list[str]) -> list[np.ndarray]:
    return tokenize_documents(_WORKER_STATE["tokenizer"], docs)


def row_dtype(vocab_size: int) -> np.dtype:
    """uint16 rows where every id fits (Llama 2's 32k and its ~60k extension), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class _TokenState:
    docs: int = 0  # train documents consumed
    carry: np.ndarray | None = None  # tokens after the last whole row
    rows: int = 0
    shards: int = 0
    done: bool = False


def _token_language(
    docs: Callable[[], Iterator[str]],
    root: Path,
    tokenizer: Any,
    seq_len: int,
    rows_per_shard: int,
    workers: int,
    batch_docs: int,
) -> dict:
    state_path = root / STATE
    state: _TokenState = pickle.loads(state_path.read_bytes()) if state_path.is_file() else _TokenState()
    for stale in root.glob("train-*.npy"):  # written after the last state save: written again below
        if int(stale.name[len("train-") : -len(".npy")]) >= state.shards:
            stale.unlink()
    bos, eos = special_token_ids(tokenizer)
    dtype = row_dtype(len(tokenizer))
    shard_tokens = rows_per_shard * seq_len
    # one shard's tokens in a preallocated buffer (int32: ids of any vocabulary), plus room for one document's
    # overflow, which grows it only for a document longer than a shard: memory is a shard, whatever the corpus
    buffer = np.empty(2 * shard_tokens, dtype=np.int32)
    filled = 0
    if state.carry is not None:
        buffer[: len(state.carry)] = state.carry
        filled = len(state.carry)

    def flush(final: bool) -> None:
        nonlocal buffer, filled
        whole = shard_tokens if not final else (filled // seq_len) * seq_len
        if whole:
            rows = buffer[:whole].reshape(-1, seq_len).astype(dtype)
            write_atomically(root / f"train-{state.shards:05d}.npy", lambda f: np.save(f, rows, allow_pickle=False))
            state.shards += 1
            state.rows += len(rows)
        rest = filled - whole
        buffer[:rest] = buffer[whole:filled]
        filled = rest
        state.carry = buffer[:rest].copy() if not final else None
        state.done = final
        _save(state_path, state)

    def remaining() -> Iterator[str]:
        for n, doc in enumerate(docs()):
            if n >= state.docs:
                yield doc

    if not state.done:
        batches = _batched(remaining(), batch_docs)
        for ids in _map_ordered(_tokenize_batch, batches, workers, {"tokenizer": tokenizer}):
            for doc in ids:
                state.docs += 1
                need = filled + len(doc) + 2
                if need > len(buffer):
                    buffer = np.concatenate([buffer[:filled], np.empty(need - filled, dtype=np.int32)])
                buffer[filled] = bos
                buffer[filled + 1 : need - 1] = doc
                buffer[need - 1] = eos
                filled = need
                while filled >= shard_tokens:  # a document longer than a shard fills several
                    flush(False)
        flush(True)
    if state.rows == 0:
        raise ValueError(
            f"training text is too small to pack: {state.docs} documents make no row of seq_len={seq_len} tokens"
        )
    files = sorted(p.name for p in root.glob("train-*.npy"))
    shard_rows = [int(np.load(root / f, mmap_mode="r").shape[0]) for f in files]
    return {"documents": state.docs, "rows": state.rows, "files": files, "shard_rows": shard_rows}


@dataclass(frozen=True)
class PreparedTokens:
    """A finished token-shard directory: ``<lang>/train-NNNNN.npy`` rows of ``seq_len`` ids per language."""

    root: Path
    manifest: dict

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    def files(self, lang: str) -> list[Path]:
        return [self.root / lang / f for f in self.manifest["languages"][lang]["files"]]


def prepare_tokens(
    train_text: dict[str, Callable[[], Iterator[str]]],
    tokenizer: Any,
    *,
    seq_len: int,
    cache_dir: str | os.PathLike,
    text_key: str,
    workers: int = 1,
    shard_tokens: int = 1 << 24,
    batch_docs: int = 256,
) -> PreparedTokens:
    """Step 2 (cached by ``text_key``, the tokenizer's hash and ``seq_len``): each language's training documents
    (``train_text[lang]()`` streams them, in order) tokenized and packed into ``.npy`` shards of rows."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    rows_per_shard = max(1, shard_tokens // seq_len)
    inputs = {
        "format": FORMAT_VERSION,
        "text": text_key,
        "tokenizer": tokenizer_hash(tokenizer),
        "seq_len": seq_len,
        "rows_per_shard": rows_per_shard,
        "languages": sorted(train_text),
    }
    root = Path(cache_dir) / "token_shards" / cache_key(inputs)
    with computed_once(root):
        if not (root / MANIFEST).is_file():
            log.info("tokenizing and packing into %s (%d worker%s)", root, workers, "" if workers == 1 else "s")
            languages = {}
            for lang in sorted(train_text):
                (root / lang).mkdir(parents=True, exist_ok=True)
                languages[lang] = _token_language(
                    train_text[lang], root / lang, tokenizer, seq_len, rows_per_shard, workers, batch_docs
                )
            manifest = {
                **inputs,
                "dtype": row_dtype(len(tokenizer)).name,
                "vocab_size": len(tokenizer),
                "bos_eos": list(special_token_ids(tokenizer)),
                "languages": languages,
                "sha256": {
                    f"{lang}/{f}": file_sha256(root / lang / f) for lang, v in languages.items() for f in v["files"]
                },
            }
            write_json_atomically(root / MANIFEST, manifest)
            for lang in languages:
                (root / lang / STATE).unlink(missing_ok=True)
    return PreparedTokens(root, json.loads((root / MANIFEST).read_text()))


def texts_key(texts: dict[str, Sequence[str]]) -> str:
    """A cache key for in-memory training texts (the data module built from lists, as tests and benchmarks do)."""
    return "texts-" + cache_key({lang: hash_texts(list(docs)) for lang, docs in texts.items()})


def prepared_counts(text: PreparedText) -> dict:
    """Per language: documents and characters per split, documents dedup removed (the numbers a run reports)."""
    out = {}
    for lang, info in text.manifest["languages"].items():
        sources = info["sources"]
        out[lang] = {
            "docs": {s: sum(src["docs"][s] for src in sources) for s in SPLITS},
            "chars": {s: sum(src["chars"][s] for src in sources) for s in SPLITS},
            "dedup_removed": sum(src["dedup_exact"] + src["dedup_near"] for src in sources),
        }
    return out
