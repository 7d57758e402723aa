"""A JSON result cache keyed by a hash of its inputs (shared by the jobs of a sweep)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def cache_key(inputs: Any) -> str:
    blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def cached_json(directory: Path, inputs: Any, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per distinct ``inputs``; later calls read the stored result."""
    path = Path(directory) / f"{cache_key(inputs)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # atomic: parallel jobs never read half a file
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
