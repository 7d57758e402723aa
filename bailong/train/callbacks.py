"""Lightning callbacks: training throughput, and a fault injector for resume tests."""
from __future__ import annotations

import os
import signal
import time

import lightning.pytorch as pl


class TokensPerSecond(pl.Callback):
    """Logs ``train/tokens_per_sec`` (tokens in optimizer steps / wall time, validation excluded)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        self.seconds += time.perf_counter() - self._t0
        self.tokens += int(batch["input_ids"].numel())
        self._t0 = None
        if self.seconds > 0:
            pl_module.log("train/tokens_per_sec", self.tokens / self.seconds, on_step=True, prog_bar=True)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class KillAtStep(pl.Callback):
    """Test fault injection: SIGKILL this process once ``global_step`` reaches ``step``.

    Runs after the checkpoint callbacks of that step (it is placed last), so a resume test sees
    exactly what a real crash would leave behind.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
