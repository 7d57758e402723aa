"""Checkpoint files that are whole or absent: a full disk or a kill mid-write never leaves a truncated one.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in the
system temp directory; moving it onto another filesystem is a copy into the final path, so a full output disk
leaves a truncated ``last.ckpt`` that the next run is told to resume from (and fails on with a zip error).
``AtomicCheckpointIO`` writes the temporary file beside the target instead, so the final ``os.replace`` is a
rename within one filesystem: atomic. The pipeline passes it as a Trainer plugin (``plugins=[...]``), which
Lightning hands to whatever strategy runs (single device, DDP, FSDP with ``state_dict_type: full``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import save as torch_save

from bailong.files import PARTIAL_SUFFIX, write_atomically  # noqa: F401  (PARTIAL_SUFFIX: what a leftover ends in)

log = logging.getLogger(__name__)


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
