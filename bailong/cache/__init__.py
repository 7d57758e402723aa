"""Results cached by a hash of their inputs, shared by the jobs of a sweep (written atomically).

Layout: ``<cache_dir>/<kind>/<entry>`` (kinds: tokenizers, base_metrics, init_rows, instruct,
random_bases, prepared_text, token_shards), and ``<cache_dir>/<kind>/.locks/<entry>.lock``, held by whichever
process computes or writes the entry; its mtime records the entry's last use. A writer fills a hidden temporary sibling
(``.<entry>.…``) under that lock and renames it into place, so ``python -m bailong.cache prune`` can tell
an orphan left by a killed writer (its lock is free) from one being written (see bailong/cache/__main__.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bailong.files import write_json_atomically

LOCKS = ".locks"  # beside the entries, not among them: a listing shows results only
_HELD: set[Path] = set()  # lock files this process holds (computed_once), so atomic_dir does not wait on itself


def default_cache_dir() -> Path:
    """The cache directory the config defaults to (``paths.cache_dir``): ``$BAILONG_CACHE``, else
    ``$BAILONG_ROOT/.cache``, the root being the repository when unset (as run.py sets it)."""
    if os.environ.get("BAILONG_CACHE"):
        return Path(os.environ["BAILONG_CACHE"])
    return Path(os.environ.get("BAILONG_ROOT") or Path(__file__).resolve().parents[2]) / ".cache"


def lock_path(entry: Path) -> Path:
    """The lock file of a cache entry: ``<kind>/.locks/<entry>.lock`` (absolute: one name per file in ``_HELD``)."""
    entry = Path(os.path.abspath(entry))
    return entry.parent / LOCKS / f"{entry.name}.lock"


def cache_key(inputs: Any) -> str:
    blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


@contextmanager
def computed_once(entry: Path) -> Iterator[None]:
    """Hold ``.locks/<entry>.lock`` while checking for and computing a cache entry: the first process (rank 0 of a
    DDP/srun job, or the first job of a sweep) computes it while the others wait, then they read it.

    A file lock rather than a process-group barrier: under Lightning's launcher and srun every rank runs
    the stages before ``fit`` before any process group exists, and sweep jobs share no group at all.
    """
    from filelock import FileLock

    lock = lock_path(entry)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        with contextlib.suppress(OSError):  # best effort: the entry's last use, which `prune --older-than` reads
            os.utime(lock)
        _HELD.add(lock)
        try:
            yield
        finally:
            _HELD.discard(lock)


def cached_json(directory: Path, inputs: Any, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per distinct ``inputs`` (concurrent callers wait for the first); later calls read
    the stored result."""
    path = Path(directory) / f"{cache_key(inputs)}.json"
    with computed_once(path):
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        write_json_atomically(path, result, indent=None)  # a reader never sees half a file
    return result


def fingerprint(model: str) -> list:
    """Name, size and mtime of a local model directory's files (a hub id stands for itself), so a
    rebuilt base invalidates results cached for the old one."""
    path = Path(model)
    if not path.is_dir():
        return [model]
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())


def hash_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    return digest.hexdigest()[:24]


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write a directory's files into a temporary sibling, then rename it into place: parallel sweep
    jobs see the whole directory or none of it (the first finisher wins). The entry's lock is held
    meanwhile (already held under ``computed_once``): a temp whose lock is free has lost its writer."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    with contextlib.nullcontext() if lock in _HELD else computed_once(target):
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            yield tmp
            try:
                os.rename(tmp, target)
            except OSError:  # another job got there first: its result is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
