"""Errors every package raises, and the range checks the config dataclasses run in ``__post_init__``.

Kept apart from bailong/checks.py so a component's config can raise them without importing the checks (which
import the model code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value outside its valid range; the message names the key, the value and what was expected."""


def unset(value: Any) -> bool:
    """A value Hydra fills in later. OmegaConf builds the schema's defaults by calling the config dataclasses with
    MISSING (``???``) and interpolations (``${paths.data_dir}/...``) as values: only the resolved values of a
    ``to_object`` call (or a direct construction) are checked."""
    return isinstance(value, str) and (value == MISSING or "${" in value)


def check_number(key: str, value: Any, test: Callable[[float], bool], expected: str, *, optional: bool = False) -> None:
    """``value`` is a number passing ``test``, or (``optional``) None; else ``ConfigError("key=value: expected …")``."""
    if unset(value) or (optional and value is None):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``; else ``ConfigError`` listing them."""
    if unset(value) or value in choices:
        return
    raise ConfigError(f"{key}={value!r}: expected one of {', '.join(str(c) for c in choices)}")
