"""Loggers that survive a resume: the CSV learning curve keeps its rows up to the checkpoint, and the W&B run
of the interrupted job continues instead of a second one starting.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it opens its directory (it assumes a new
experiment), so a run resumed in its own directory (``ckpt_path=… hydra.run.dir=<run>``) would lose every row
before the crash. ``ResumableCSVLogger`` keeps the rows logged before the checkpoint's step (the resumed run
logs the later ones again) and flushes at every logging step, so a crash loses no row the checkpoint covers.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from bailong.files import write_text_atomically

WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the W&B run a resume continues


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` keeps its rows with ``step < keep_before``
    (all of it is deleted when ``keep_before`` is None, as Lightning does)."""

    def __init__(self, log_dir: str, keep_before: int | None) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.keep_before is None or not path.is_file():
            return super()._check_log_dir_exists()
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < self.keep_before]
        kept = io.StringIO(newline="")
        writer = csv.DictWriter(kept, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomically(path, kept.getvalue())
        self.metrics_keys = header  # later rows append under this header (a new key rewrites it, as in Lightning)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` continues across a resume (``resume_step``: the checkpoint's global
    step, set by the pipeline when ``ckpt_path`` is given)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.resume_step)
        return self._experiment


def checkpoint_step(ckpt_path: str | os.PathLike) -> int:
    """The ``global_step`` a Lightning checkpoint was saved at (read without unpickling; memory-mapped)."""
    import torch

    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resume_kwargs(logger_class: type, out: Path, ckpt_path: str | None) -> dict:
    """Constructor arguments that make a logger of ``logger_class`` continue the run in ``out`` (empty for a new
    run): the CSV rows up to the checkpoint's step; the W&B run recorded in ``<out>/wandb_run_id``."""
    from lightning.pytorch.loggers import WandbLogger

    if not ckpt_path:
        return {}
    if issubclass(logger_class, ResumableCSVLogger):
        return {"resume_step": checkpoint_step(ckpt_path)}
    id_file = out / WANDB_ID_FILE
    if issubclass(logger_class, WandbLogger) and id_file.is_file():
        return {"id": id_file.read_text().strip(), "resume": "allow"}
    return {}


def record_wandb_id(logger, out: Path) -> None:
    """Write the W&B run id beside the run's outputs, so a resume continues that run (after the run started)."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger.version:
        (out / WANDB_ID_FILE).write_text(str(logger.version))
