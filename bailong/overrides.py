"""What the command line changed: Hydra's task overrides as values and tags.

The resolvers ``bailong.sweep_group``, ``bailong.override_values`` and ``bailong.override_tags`` (registered by
bailong/config.py) name a run by its place in a sweep (conf/logger/wandb.yaml): one W&B group per sweep, the swept
values as tags and config, so the W&B UI compares a sweep's runs without hand work. The stages read the overrides
to redact a secret typed on the command line; the dashboard parses them back into values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def sweep_group(task_name: str) -> str:
    """``<task_name>-<sweep dir name>`` in a multirun (one group per sweep), else ``task_name``."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return task_name


def override_value(text: str) -> Any:
    """An override's value typed as YAML (``8`` → 8, ``random`` → "random"); lists and dicts stay text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def override_values() -> dict[str, Any]:
    """The run's command-line and swept overrides as ``{key: value}`` (``lora.r=8`` → ``{"lora.r": 8}``)."""
    values = {}
    for override in task_overrides():
        key, _, text = override.lstrip("+~").partition("=")
        values[key] = override_value(text)
    return values


def override_tags(*fixed: str) -> list[str]:
    """``fixed`` tags, then one ``key=value`` tag per override not already among them (W&B allows 64 chars)."""
    tags = list(fixed) + [o.lstrip("+~") for o in task_overrides()]
    return [t[:64] for t in dict.fromkeys(tags)]
