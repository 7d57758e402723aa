"""Which language an answer is in — Traditional Chinese, Simplified Chinese or English — and how pure
its Traditional script is, by character classes and OpenCC; no model involved.

Definitions (measured on this repository's data in ``docs/bilingual_eval.md``):

- *Han characters*: CJK Unified Ideographs (with extension A and compatibility ideographs).
- *Script of a Han character*, by converting the whole text with OpenCC ``s2tw`` and ``tw2s`` (Taiwan
  standard forms, as in this data: plain ``s2t`` would flag Taiwan's 床 as Simplified for 牀; phrase
  dictionaries see context: 皇后 stays 皇后, 以后 becomes 以後) and comparing position by position:
  ``traditional`` if ``tw2s`` changes it and ``s2tw`` does not (們, 國); ``simplified`` if ``s2tw``
  changes it and ``tw2s`` does not (们, 国); ``shared`` if neither changes it (人, 山, 月 — valid in both).
- *Traditional purity* = traditional / (traditional + simplified) over an answer's Han characters:
  1.0 for Traditional text, 0.0 for Simplified. Shared characters carry no evidence and are left out,
  so a fully Simplified answer scores 0, not the ~0.66 that "share of Han characters unchanged by s2t"
  would give. ``None`` when the text has no distinguishing character.
- *Language*: ``en`` if the answer has more Latin-letter words than Han characters, else Chinese —
  ``sc`` if its purity is below 0.5, ``tc`` otherwise (an answer of only shared characters reads as
  valid Traditional). ``unknown`` when it has neither Han characters nor Latin words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

LANGS = ("tc", "sc", "en")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@cache
def _converter(config: str):
    import opencc

    return opencc.OpenCC(config)


def _convert_aligned(text: str, config: str) -> str:
    """OpenCC conversion of ``text``, position-aligned with it. ``s2tw``/``tw2s`` map character to
    character; if a phrase rule ever changed the length, fall back to converting character by character."""
    out = _converter(config).convert(text)
    if len(out) == len(text):
        return out
    return "".join(_converter(config).convert(ch) for ch in text)


@dataclass(frozen=True)
class ScriptCounts:
    han: int
    traditional: int
    simplified: int
    latin_words: int

    @property
    def purity(self) -> float | None:
        distinguishing = self.traditional + self.simplified
        return self.traditional / distinguishing if distinguishing else None


def script_counts(text: str) -> ScriptCounts:
    """Han characters by script (traditional / simplified / shared) and Latin words of ``text``."""
    to_trad, to_simp = _convert_aligned(text, "s2tw"), _convert_aligned(text, "tw2s")
    han = trad = simp = 0
    for ch, t, s in zip(text, to_trad, to_simp):
        if not HAN.match(ch):
            continue
        han += 1
        if s != ch and t == ch:
            trad += 1
        elif t != ch and s == ch:
            simp += 1
    return ScriptCounts(han=han, traditional=trad, simplified=simp, latin_words=len(LATIN_WORD.findall(text)))


def traditional_purity(text: str) -> float | None:
    """Share of distinguishing Han characters written in Traditional form (see the module docstring)."""
    return script_counts(text).purity


def identify_language(text: str) -> str:
    """``tc``, ``sc``, ``en`` or ``unknown`` (see the module docstring for the rule)."""
    counts = script_counts(text)
    if counts.han == 0 and counts.latin_words == 0:
        return "unknown"
    if counts.latin_words > counts.han:
        return "en"
    purity = counts.purity
    return "sc" if purity is not None and purity < 0.5 else "tc"


def language_consistent(prompt_lang: str, answer: str, expected_lang: str | None = None) -> bool:
    """Is ``answer`` in the language it should be? ``expected_lang`` defaults to ``prompt_lang``; give it
    for prompts that ask for a translation into the other language. Simplified Chinese never counts as
    Traditional, and an empty answer is never consistent."""
    expected = expected_lang or prompt_lang
    for name, value in (("prompt_lang", prompt_lang), ("expected_lang", expected)):
        if value not in LANGS:
            raise ValueError(f"{name}={value!r}: expected one of {', '.join(LANGS)}")
    return identify_language(answer) == expected
