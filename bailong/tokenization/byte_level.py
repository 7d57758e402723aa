"""Extending a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen 2.5: a ``tokenizers`` BPE model behind a ByteLevel
pre-tokenizer, merges ranked, no byte-fallback pieces) with Traditional Chinese tokens and the merges that make them.

A byte-level BPE model has no pieces to append on their own: a token exists for the encoder only through the
merge that builds it. So new merges are learned on the TC training text under the base's own normalizer and
pre-tokenizer (a ``tokenizers`` BpeTrainer over the same 256-symbol byte alphabet), and kept, in the order
learned, when

- their token is not already a base token,
- both parts are tokens (base ones or ones kept before), and
- their token contains a byte that starts a character of U+3000–U+9FFF (lead bytes 0xE3–0xE9: CJK punctuation,
  kana, CJK unified ideographs and extension A),

until ``added_vocab`` are kept. They get ids after every existing id (special tokens included) and rank after
every base merge. Why text without such characters encodes exactly as before: BPE applies the lowest-ranked
merge available until none is, so the new merges can only act on the base's final tokens; a new merge joins two
parts whose bytes concatenate to its token, which contains a lead byte 0xE3–0xE9, so one part does too; and no
character outside U+3000–U+9FFF has such a byte in UTF-8. Every base id keeps its token and every base merge its
rank (``tests/test_byte_level.py`` checks this on held-out English and code and as a property over arbitrary
text without those characters).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .train import TokenizerConfigError

CJK_LEAD_BYTES = frozenset(range(0xE3, 0xEA))  # UTF-8 lead bytes of U+3000–U+9FFF


def byte_decoder() -> dict[str, int]:
    """The ByteLevel alphabet's characters to the bytes they stand for (GPT-2's ``bytes_to_unicode``, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTES = byte_decoder()


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for."""
    return bytes(BYTES[ch] for ch in token)


def whole_text(token: str) -> str:
    """The text a byte-level token stands for, or "" when its bytes are not whole UTF-8 characters."""
    try:
        return token_bytes(token).decode("utf-8")
    except UnicodeDecodeError:
        return ""


def has_cjk_lead_byte(token: str) -> bool:
    return any(b in CJK_LEAD_BYTES for b in token_bytes(token))


def _uses_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(c) for c in component.get("pretokenizers", []))


def is_byte_level_bpe(spec: dict) -> bool:
    """Whether a tokenizer.json describes a byte-level BPE tokenizer (a BPE model behind a ByteLevel pre-tokenizer)."""
    return (spec.get("model") or {}).get("type") == "BPE" and _uses_byte_level(spec.get("pre_tokenizer"))


def check_byte_level_bpe(spec: dict, source: str) -> None:
    """Refuse a tokenizer this extension does not apply to, naming what it is and what is supported."""
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise TokenizerConfigError(
            f"{source}: a {kind} tokenizer; extension supports BPE only: SentencePiece BPE with byte fallback "
            "(Llama 2, Mistral v1) or byte-level BPE (GPT-2, Llama 3, Qwen 2.5)"
        )
    if not _uses_byte_level(spec.get("pre_tokenizer")):
        raise TokenizerConfigError(
            f"{source}: a BPE tokenizer without a ByteLevel pre-tokenizer; byte-level extension needs one (GPT-2, "
            "Llama 3, Qwen 2.5 style)"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerConfigError(f"{source}: model.{key}={model[key]!r}; byte-level extension expects none")
    if model.get("byte_fallback"):
        raise TokenizerConfigError(f"{source}: byte_fallback in a byte-level BPE model is not supported")


def _merge_pair(merge: Any) -> tuple[str, str]:
    """A merge as written in tokenizer.json: ``["a", "b"]`` (tokenizers >= 0.20) or ``"a b"``."""
    if isinstance(merge, str):
        left, _, right = merge.partition(" ")
        return left, right
    return merge[0], merge[1]


def learned_merges(spec: dict, texts: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """Merges a BpeTrainer learns on ``texts`` under the base's normalizer and pre-tokenizer, in rank order."""
    base = Tokenizer.from_str(json.dumps(spec))
    learner = Tokenizer(models.BPE())
    learner.normalizer = base.normalizer
    learner.pre_tokenizer = base.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learner.train_from_iterator(texts, trainer)
    return [_merge_pair(m) for m in json.loads(learner.to_str())["model"]["merges"]]


def kept_merges(learned: Iterable[tuple[str, str]], vocab: Iterable[str], limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` of ``learned`` that pass the rules of the module docstring, in order."""
    known = set(vocab)
    kept: list[tuple[str, str]] = []
    for left, right in learned:
        token = left + right
        if token in known or left not in known or right not in known or not has_cjk_lead_byte(token):
            continue
        kept.append((left, right))
        known.add(token)
        if len(kept) == limit:
            break
    return kept


def extend_byte_level(
    spec: dict, tc_texts: list[str], added_vocab: int, *, source: str = "tokenizer.json", search_factor: int = 4
) -> tuple[dict, list[str]]:
    """``(extended tokenizer.json as a dict, the added tokens in id order)``; see the module docstring.

    ``search_factor``: the learner's vocabulary is first ``search_factor * added_vocab`` merges beyond its alphabet,
    of which those that pass the rules are kept (many are base tokens already: a base that holds much Chinese, as
    Qwen's does, keeps few); while too few pass, the search grows fourfold until the text has no more merges to
    learn, and then ``added_vocab`` is refused as more than the text can supply."""
    check_byte_level_bpe(spec, source)
    spec = json.loads(json.dumps(spec))  # a copy: the caller's base stays as it was
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    added: list[tuple[str, str]] = []
    if added_vocab > 0:
        search = search_factor * added_vocab
        while True:
            learned = learned_merges(spec, tc_texts, 256 + search)
            added = kept_merges(learned, vocab, added_vocab)
            if len(added) == added_vocab or len(learned) < search:  # enough, or every merge the text has
                break
            search *= 4
        if len(added) < added_vocab:
            raise TokenizerConfigError(
                f"tokenizer.added_vocab={added_vocab} is larger than the TC corpus can supply to {source}: of the "
                f"{len(learned)} merges it holds, {len(added)} make tokens the base lacks. Valid: 0 (no extension) "
                f"or 1..{len(added)}; or use a larger corpus."
            )
    if not added:
        return spec, []
    # Special tokens that sit after the vocabulary only as added tokens (Llama 3's 256, Qwen's) become vocabulary
    # entries at their own ids first: ``tokenizers`` numbers an added token missing from the model's vocabulary
    # after the model's vocabulary, so appended tokens would push them to new ids. The BPE model never produces
    # them (no merge builds them; added tokens are split off before the model runs), so nothing else changes.
    for special in spec.get("added_tokens", []):
        if special["content"] not in vocab and special["id"] not in set(vocab.values()):
            vocab[special["content"]] = special["id"]
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        gap = next(i for i, v in enumerate(ids) if v != i)
        raise TokenizerConfigError(f"{source}: ids are not contiguous (no token has id {gap}); cannot append to them")
    next_id = len(ids)
    written_as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for offset, (left, right) in enumerate(added):
        vocab[left + right] = next_id + offset
        model["merges"].append(f"{left} {right}" if written_as_strings else [left, right])
    return spec, [left + right for left, right in added]


__all__ = [
    "CJK_LEAD_BYTES",
    "check_byte_level_bpe",
    "extend_byte_level",
    "has_cjk_lead_byte",
    "is_byte_level_bpe",
    "kept_merges",
    "token_bytes",
    "whole_text",
]
