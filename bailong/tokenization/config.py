"""The tokenizer extension's configuration (``tokenizer``)."""

from __future__ import annotations

from dataclasses import dataclass

from bailong.errors import check_number


@dataclass
class TokenizerConfig:
    name: str = "extend"
    added_vocab: int = 8000  # pieces appended to the base vocabulary (0 = keep the base tokenizer)
    character_coverage: float = 0.9995
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("tokenizer.added_vocab", self.added_vocab, lambda v: v >= 0, "an integer >= 0 (0: no extension)")
        check_number(
            "tokenizer.character_coverage", self.character_coverage, lambda v: 0 < v <= 1, "a number in (0, 1]"
        )
