"""Results cached by a hash of their inputs, shared by the jobs of a sweep (written atomically)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable


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

    locks = entry.parent / ".locks"  # beside the entries, not among them: a listing shows results only
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{entry.name}.lock")):
        yield


def cached_json(directory: Path, inputs: Any, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per distinct ``inputs`` (concurrent callers wait for the first); later calls read
    the stored result."""
    path = Path(directory) / f"{cache_key(inputs)}.json"
    with computed_once(path):
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # atomic: a reader never sees half a file
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh)
        os.replace(tmp, path)
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
    jobs see the whole directory or none of it (the first finisher wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
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
