"""The optimisation settings (``train``) and the Lightning Trainer's arguments (``trainer``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
