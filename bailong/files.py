"""Files that are whole or absent: every result a run or a cache writes goes through ``write_atomically``.

A temporary file beside the target (same filesystem, so the final rename is atomic), flushed and fsynced, renamed
over the target, then the directory fsynced; on any failure (a full disk, an interrupt) the temporary file is
removed and the target keeps its previous content. The temporary name is hidden and ends in ``.partial`` (never
``.json``/``.ckpt``), so a leftover is never read as a result; ``python -m bailong.cache prune`` removes those a
killed writer left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


def write_atomically(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``target`` and rename it to ``target``. New files get
    0666 less the umask, as any other file (mkstemp's 0600 would hide a run's records from a colleague)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)  # the rename itself survives a power loss


def write_text_atomically(target: Path, text: str) -> None:
    write_atomically(target, lambda f: f.write(text.encode("utf-8")))


def write_json_atomically(target: Path, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as UTF-8 JSON (non-ASCII kept as written: the run's Chinese text stays readable)."""
    write_text_atomically(target, json.dumps(obj, indent=indent, ensure_ascii=False))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
