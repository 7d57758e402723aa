"""Lightning callbacks: training throughput, a stop on non-finite loss or gradients, and a fault
injector for resume tests."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


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


class NonFiniteGuard(pl.Callback):
    """Stop on a non-finite loss or gradient and keep the last good state in ``<dirpath>/last_good.ckpt``.

    Both checks fire before the optimizer applies the bad step: ``PretrainModule.training_step`` raises
    ``FloatingPointError`` on a non-finite loss (before backward), and ``on_before_optimizer_step`` checks
    every trainable gradient after backward (a finite loss can still overflow a gradient). So the
    parameters, optimizer state and step counter saved here are those after the last good update, and
    ``ckpt_path=<that file>`` resumes from them (with a lower learning rate, or other data).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str = "last_good.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.saved_path: Path | None = None

    def _path(self, trainer: pl.Trainer) -> Path:
        dirpath = self.dirpath or (trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = [n for n, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite gradient at step {trainer.global_step} in {len(bad)} parameter(s), e.g. {bad[0]}; "
                "lower train.lr or check the data"
            )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, FloatingPointError) or self.saved_path is not None:
            return
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)  # nothing of the bad step has been applied yet
        self.saved_path = path
        note = f"training stopped before applying step {trainer.global_step}; the last good state is saved in {path}"
        exception.add_note(note)
        log.error("%s: %s", exception, note)


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


class GatherFullState(pl.Callback):
    """FSDP: the trainable parameters' whole values, gathered from every rank's shard onto rank 0's CPU when
    training ends, before Lightning's teardown moves the sharded module off the GPU (the pipeline adds
    this callback itself under ``FSDPStrategy``; every rank takes part in the gather).

    ``state`` maps the names of the unwrapped model (``model.named_parameters()`` of the LightningModule's
    ``model``) to tensors; only rank 0 holds it.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # offload only from a GPU: on the CPU "offloading" is no copy and rank0_only then leaves the other
        # ranks with freed memory (see bailong.train.strategies)
        on_gpu = trainer.strategy.root_device.type == "cuda"
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=on_gpu, offload_to_cpu=on_gpu):
            if trainer.is_global_zero:
                self.state = {unwrapped_name(n): p.detach().cpu().clone()
                              for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the gathered values into ``model`` (built as the trained one was); every one must land."""
        if self.state is None:
            raise RuntimeError("GatherFullState has no state: training did not end on this rank (rank 0 only)")
        params = dict(model.named_parameters())
        missing = sorted(set(self.state) - set(params))
        if missing:
            raise RuntimeError(f"gathered FSDP parameters not in the rebuilt model: {missing[:5]}")
        with torch.no_grad():
            for name, value in self.state.items():
                if params[name].shape != value.shape:
                    raise RuntimeError(f"{name}: gathered shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(value)


def unwrapped_name(name: str) -> str:
    """A parameter's name without the ``_fsdp_wrapped_module.`` segments FSDP's wrappers add."""
    return name.replace("_fsdp_wrapped_module.", "")
