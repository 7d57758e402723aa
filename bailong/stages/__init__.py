"""The experiment's stages; ``run.py`` runs the one ``cfg.stage`` names.

A stage is a module with ``run(cfg) -> metrics``: ``prepare`` (data preparation: text and token shards, cached for
the stages that train, bailong/stages/prepare.py), ``pretrain`` (continued pre-training, bailong/stages/pretrain.py)
and ``sft`` (instruction tuning from a pre-training run or the base, bailong/stages/sft.py); the steps they share
live in bailong/stages/common.py. A new stage is a module plus one line in ``STAGES``.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from bailong.errors import ConfigError
from bailong.stages import prepare, pretrain, sft

STAGES: dict[str, Callable[[DictConfig], dict]] = {"prepare": prepare.run, "pretrain": pretrain.run, "sft": sft.run}


def run(cfg: DictConfig) -> dict:
    """Run the stage ``cfg.stage`` names; its metrics (also written to the run directory's metrics.json)."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r}: expected one of {', '.join(STAGES)}")
    return STAGES[cfg.stage](cfg)
