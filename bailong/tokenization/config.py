"""The tokenizer extension's configuration (``tokenizer``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenizerConfig:
    name: str = "extend"
    added_vocab: int = 8000  # pieces appended to the base vocabulary (0 = keep the base tokenizer)
    character_coverage: float = 0.9995
    seed: int = 0
