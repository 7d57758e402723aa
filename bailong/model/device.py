"""Where a run computes: the accelerator the trainer config names, this process's share of it, and the
numeric precision it trains in.

Every stage that runs the model outside Lightning's loop (the init strategies' corpus passes, base and
step-0/final bits/char, MC, bench, chat, export) asks here, so a GPU run never falls back to the CPU for
them and each DDP rank uses its own GPU.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISION_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def local_rank() -> int:
    """This process's index on its node: ``LOCAL_RANK`` (Lightning's launcher, torchrun) or ``SLURM_LOCALID``
    (srun starts every rank itself); 0 in a single process."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def global_rank() -> int:
    """This process's rank in the whole job, readable before the process group exists (ranks 1..N start
    the pipeline from the top under Lightning's launcher and srun)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def run_device(accelerator: str = "auto", index: int | None = None) -> torch.device:
    """The torch device of ``trainer.accelerator`` for this process (``cuda:<local rank>`` under DDP).

    ``auto`` picks CUDA when torch sees a GPU, else the CPU, as Lightning's ``accelerator="auto"`` does.
    """
    accelerator = str(accelerator).lower()
    if accelerator not in ACCELERATORS:
        raise ValueError(f"trainer.accelerator={accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "mps":
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.accelerator={accelerator!r} but torch sees no CUDA device "
            "(use trainer=cpu, or install a CUDA build of torch)"
        )
    return torch.device("cuda", local_rank() if index is None else index)


def autocast(device: torch.device, precision: str | int) -> AbstractContextManager:
    """The autocast Lightning's ``trainer.precision`` applies in training (``bf16-mixed``, ``16-mixed``), for
    the evaluations that run outside its loop, so they compute as training did; a no-op otherwise."""
    dtype = PRECISION_AUTOCAST.get(str(precision))
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
