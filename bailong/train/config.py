"""The optimisation settings (``train``) and the Lightning Trainer's arguments (``trainer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bailong.errors import ConfigError, check_choice, check_number, unset

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
# AdamW moves every weight by about lr per step whatever the gradient's scale, so an lr above 1 moves weights of
# size ~0.01-1 by more than their own size each step: never sane. Continued pre-training uses 1e-5..1e-3.
MAX_LR = 1.0


@dataclass
class TrainConfig:
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    lr: float = 2e-4
    embedding_lr: float | None = None  # new-row parameters; default: lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps
    gradient_checkpointing: bool = False
    checkpoint_every_n_steps: int = 50

    def __post_init__(self) -> None:
        """AdamW and the warm-up/cosine schedule can use these values (a too-high lr that is still legal warns in
        bailong.checks, which also knows whether a paged optimizer has its GPU)."""
        for key in ("lr", "embedding_lr"):
            check_number(
                f"train.{key}",
                getattr(self, key),
                lambda v: math.isfinite(v) and 0 < v <= MAX_LR,
                f"a finite number in (0, {MAX_LR:g}]: AdamW moves each weight by about lr per step, so continued "
                "pre-training uses 1e-5..1e-3 (default train.lr=2e-4)",
                optional=key == "embedding_lr",  # default: train.lr
            )
        check_number("train.warmup_steps", self.warmup_steps, lambda v: v >= 0, "an integer >= 0 (0 = no warm-up)")
        check_number(
            "train.min_lr_ratio",
            self.min_lr_ratio,
            lambda v: 0 <= v <= 1,
            "a number in [0, 1]: the cosine floor as a share of the peak lr",
        )
        betas = self.betas if unset(self.betas) else list(self.betas)
        if not unset(betas) and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"train.betas={betas}: AdamW takes two decay rates, each in [0, 1) (default [0.9, 0.95])")
        check_number(
            "train.weight_decay", self.weight_decay, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"
        )
        check_number(
            "train.checkpoint_every_n_steps",
            self.checkpoint_every_n_steps,
            lambda v: v >= 0,
            "an integer >= 0 (0 = only at validation)",
        )
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)


@dataclass
class TrainerConfig:
    """Keys are ``lightning.pytorch.Trainer`` arguments."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "32-true"
    max_steps: int = 100
    max_epochs: int = -1
    val_check_interval: Any = 50
    check_val_every_n_epoch: int | None = None
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 5
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    deterministic: Any = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    default_root_dir: str = "${paths.output_dir}"
