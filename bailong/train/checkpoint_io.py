"""Checkpoint files that are whole or absent: a full disk or a kill mid-write never leaves a truncated one.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in the
system temp directory; moving it onto another filesystem is a copy into the final path, so a full output disk
leaves a truncated ``last.ckpt`` that the next run is told to resume from (and fails on with a zip error).
``AtomicCheckpointIO`` writes the temporary file beside the target instead, so the final ``os.replace`` is a
rename within one filesystem: atomic. The pipeline passes it as a Trainer plugin (``plugins=[...]``), which
Lightning hands to whatever strategy runs (single device, DDP, FSDP with ``state_dict_type: full``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import save as torch_save

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"  # not ``.ckpt``: a leftover is never taken for a checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: the checkpoint is written to a hidden temporary file in
    the target's directory, flushed and fsynced, then renamed over the target (``os.replace``). On any failure
    (``OSError`` such as ENOSPC, or an interrupt) the temporary file is removed and the error re-raised: the target
    path holds either its previous complete content or the new complete checkpoint. Remote paths (``s3://`` …) go
    to Lightning's own implementation."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda f: torch_save(checkpoint, f))


def write_atomically(target: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, fsync it and rename it to ``target``; on failure
    remove the temporary file and re-raise, leaving ``target`` as it was."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    # 0o666 less the umask, as for any new file (mkstemp would make it 0600)
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


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
