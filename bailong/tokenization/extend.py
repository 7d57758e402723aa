"""Pipeline stage 1: the base tokenizer plus appended Traditional Chinese pieces, cached on disk.

``extend_tokenizer`` writes a directory holding the merged SentencePiece ``tokenizer.model`` and a
transformers tokenizer (``tokenizer.json``) that encodes exactly as that SentencePiece model does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bailong.cache import computed_once

from .byte_level import extend_byte_level, whole_text
from .merge import append_pieces, candidate_pieces, new_characters
from .train import (
    WHITESPACE_PIECE,
    TokenizerConfigError,
    check_base_supported,
    load_model_proto,
    max_sentence_bytes,
    normalized_sentences,
    required_characters,
    train_bpe,
    trainer_options,
    training_sentences,
    warn_if_not_traditional_chinese,
)

# Bump when a change to this package changes the tokenizer it writes: old cache entries then miss.
CODE_VERSION = "1"
MANIFEST = "extension.json"
SP_MODEL_FILE = "tokenizer.model"  # the merged SentencePiece model, beside the transformers files
BYTE_LEVEL_FILE = "tokenizer.json"  # a byte-level BPE base's only tokenizer file
_HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MAX_TRAINING_ROUNDS = 6


@dataclass(frozen=True)
class ExtendedTokenizer:
    path: Path  # HF tokenizer directory (also holds the merged tokenizer.model)
    num_base: int
    num_added: int
    num_new_chars: int  # of the added pieces, single characters the base lacked
    vocab_size: int
    cache_key: str
    cached: bool  # True when an earlier call's output was reused


def read_base_model(base: str | os.PathLike, revision: str | None = None) -> tuple[bytes, str]:
    """Bytes of the base tokenizer: a directory's ``tokenizer.model`` (SentencePiece) or, without one, its
    ``tokenizer.json`` (byte-level BPE: ``bailong/tokenization/byte_level.py``), a .model or .json file, or a hub
    repo id (``tokenizer.model``, else ``tokenizer.json``). ``is_tokenizer_json`` tells the two apart."""
    path = Path(base)
    if path.is_dir():
        model_file = path / SP_MODEL_FILE
        if not model_file.is_file() and (path / BYTE_LEVEL_FILE).is_file():
            model_file = path / BYTE_LEVEL_FILE
        if not model_file.is_file():
            raise TokenizerConfigError(
                f"tokenizer.base={str(base)!r}: directory has neither tokenizer.model (SentencePiece) nor "
                "tokenizer.json (byte-level BPE)"
            )
    elif path.is_file():
        model_file = path
    elif _HUB_REPO_ID.match(str(base)) and not str(base).startswith((".", "/")):
        from huggingface_hub import hf_hub_download  # only the hub path needs it

        model_file, failures = None, []
        for name in (SP_MODEL_FILE, BYTE_LEVEL_FILE):  # a byte-level BPE base (Llama 3, Qwen 2.5): tokenizer.json
            try:
                model_file = Path(hf_hub_download(str(base), name, revision=revision))
                break
            except Exception as err:  # noqa: BLE001  hub errors come in many classes (offline, gated, missing)
                failures.append(f"{name}: {err}")
        if model_file is None:
            raise TokenizerConfigError(
                f"tokenizer.base={str(base)!r}: could not fetch a tokenizer from the Hugging Face hub "
                f"({'; '.join(failures)})"
            )
    else:
        raise TokenizerConfigError(
            f"tokenizer.base={str(base)!r}: not a directory with tokenizer.model, a .model file, or a hub repo id"
        )
    return model_file.read_bytes(), str(model_file)


def is_tokenizer_json(base_bytes: bytes) -> bool:
    """Whether the base bytes are a ``tokenizer.json`` (byte-level BPE) rather than a SentencePiece model."""
    return base_bytes.lstrip()[:1] == b"{"


def cache_key(base_bytes: bytes, tc_texts: list[str], added_vocab: int, options: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"code": CODE_VERSION, "added_vocab": added_vocab, **options}, sort_keys=True).encode())
    digest.update(hashlib.sha256(base_bytes).digest())
    if added_vocab > 0:  # without extension the texts do not matter: share one entry
        for text in tc_texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# choosing the pieces


def _too_small(added_vocab: int, num_new_chars: int, coverage: float) -> TokenizerConfigError:
    return TokenizerConfigError(
        f"tokenizer.added_vocab={added_vocab} is too small: the TC corpus needs {num_new_chars} characters "
        f"(character_coverage={coverage}) that the base tokenizer lacks, and longer pieces are unreachable "
        f"without them. Valid: 0 (no extension) or at least {num_new_chars}; or lower character_coverage."
    )


def _too_large(added_vocab: int, num_new_chars: int, supply: int) -> TokenizerConfigError:
    return TokenizerConfigError(
        f"tokenizer.added_vocab={added_vocab} is larger than the TC corpus can supply: it yields at most "
        f"{supply} new CJK pieces. Valid: 0 (no extension) or {num_new_chars}..{supply}; or use a larger corpus."
    )


def choose_pieces(
    base: model_pb2.ModelProto,
    tc_texts: list[str],
    added_vocab: int,
    *,
    character_coverage: float,
    seed: int,
    num_threads: int,
) -> tuple[list[str], dict]:
    """The ``added_vocab`` pieces to append and a record of how they were found."""
    sentences = training_sentences(tc_texts, max_sentence_bytes(base))
    options = trainer_options(base)
    required = required_characters(normalized_sentences(sentences, base), character_coverage)
    new_chars = new_characters(required, base)
    if added_vocab < len(new_chars):
        raise _too_small(added_vocab, len(new_chars), character_coverage)
    # SentencePiece needs room for every required character plus meta pieces; beyond that, how many
    # merges yield usable (new, CJK, reachable) pieces is learnt from the first round.
    floor = len(required) + 3 + 256 + 1
    merges_wanted = max(2 * (added_vocab - len(new_chars)), 1000)
    record = {"required_chars": len(required), "new_chars": len(new_chars), "sentences": len(sentences)}
    started = time.perf_counter()
    for _ in range(_MAX_TRAINING_ROUNDS):
        vocab_size = floor + merges_wanted
        trained = train_bpe(
            sentences, vocab_size, options, character_coverage=character_coverage, seed=seed, num_threads=num_threads
        )
        pieces = candidate_pieces(base, trained, new_chars)
        record.update(train_vocab_size=vocab_size, trained_pieces=len(trained.pieces))
        if len(pieces) >= added_vocab:
            record["train_seconds"] = round(time.perf_counter() - started, 3)
            return pieces[:added_vocab], record
        if len(trained.pieces) < vocab_size:  # the trainer ran out of merges: the corpus is exhausted
            raise _too_large(added_vocab, len(new_chars), len(pieces))
        usable_per_merge = max(len(pieces) - len(new_chars), 1) / max(len(trained.pieces) - floor, 1)
        merges_wanted = math.ceil(1.3 * (added_vocab - len(new_chars)) / usable_per_merge) + 1000
    raise RuntimeError(f"tokenizer extension: no {added_vocab} usable pieces after {_MAX_TRAINING_ROUNDS} rounds")


# ---------------------------------------------------------------------------------------------
# the transformers tokenizer


def bpe_merges(proto: model_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every pair of pieces that concatenates to a NORMAL piece, ranked as SentencePiece ranks merges.

    SentencePiece merges the adjacent pair whose result scores highest; ranking by score (not by id,
    as transformers 5's converter does) keeps bases whose scores are not monotone in id exact,
    e.g. Mistral's whitespace pieces (score -1e9, low ids).
    """
    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    vocab = {p.piece for p in proto.pieces if p.type == normal}
    ranked = sorted(
        ((-p.score, i, p.piece) for i, p in enumerate(proto.pieces) if p.type == normal and len(p.piece) > 1)
    )
    return [
        (piece[:k], piece[k:])
        for _, _, piece in ranked
        for k in range(1, len(piece))
        if piece[:k] in vocab and piece[k:] in vocab
    ]


def hf_tokenizer_from_proto(proto: model_pb2.ModelProto) -> PreTrainedTokenizerFast:
    """A transformers tokenizer that encodes and decodes as the SentencePiece model ``proto`` does.

    The space prefix is a normaliser (always prepended, as SentencePiece's add_dummy_prefix does)
    rather than transformers 5's Metaspace pre-tokeniser, which skips the prefix when the text
    already starts with a space, so " x" and "x" would encode alike and not round-trip.
    """
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.treat_whitespace_as_suffix or norm.remove_extra_whitespaces:
        raise TokenizerConfigError(
            "base tokenizer uses treat_whitespace_as_suffix or remove_extra_whitespaces; only the Llama layout "
            "(space prefix, whitespace kept) is supported"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[spec.unk_id].piece
    backend = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(WHITESPACE_PIECE))
    steps.append(normalizers.Replace(" ", WHITESPACE_PIECE))
    backend.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(content=" ", left=1, right=0)] if norm.add_dummy_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(WHITESPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )

    def special(token_id: int) -> str | None:
        return proto.pieces[token_id].piece if 0 <= token_id < len(proto.pieces) else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=special(spec.bos_id),
        eos_token=special(spec.eos_id),
        pad_token=special(spec.pad_id),
        add_bos_token=spec.bos_id >= 0,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # the clean-up deletes spaces before punctuation: not lossless
    )
    if len(tokenizer) != len(proto.pieces):
        raise RuntimeError(
            f"transformers tokenizer has {len(tokenizer)} tokens, the SentencePiece model {len(proto.pieces)}"
        )
    return tokenizer


def sentencepiece_matches(tokenizer: Any, sp_model: str | os.PathLike) -> bool:
    """Whether ``sp_model`` exists and is ``tokenizer``'s SentencePiece model: piece ``i`` is token ``i`` for every
    piece (tokens past them, added ones, may follow). Tools that read ``tokenizer.model`` (llama.cpp's converter)
    must get the vocabulary the weights were trained with, never a stale file beside it."""
    path = Path(sp_model)
    if not path.is_file():
        return False
    processor = SentencePieceProcessor(model_file=str(path))
    pieces = [processor.id_to_piece(i) for i in range(processor.vocab_size())]
    return len(pieces) <= len(tokenizer) and tokenizer.convert_ids_to_tokens(list(range(len(pieces)))) == pieces


def load_tokenizer(path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerFast:
    """The transformers tokenizer saved by ``extend_tokenizer`` (kwargs go to AutoTokenizer.from_pretrained)."""
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def _check_spm_loads(proto: model_pb2.ModelProto) -> None:
    processor = SentencePieceProcessor(model_proto=proto.SerializeToString())
    if processor.vocab_size() != len(proto.pieces):
        raise RuntimeError("merged SentencePiece model does not load with all its pieces")


# ---------------------------------------------------------------------------------------------
# the stage


def extend_tokenizer(
    base: str | os.PathLike,
    tc_texts: list[str],
    added_vocab: int,
    cache_dir: str | os.PathLike,
    *,
    character_coverage: float = 0.9995,
    seed: int = 0,
    num_threads: int | None = None,
    revision: str | None = None,
    corpus_name: str = "data.tc (train split)",
) -> ExtendedTokenizer:
    """Append ``added_vocab`` TC pieces to ``base`` (0: the base as it is); reuse a cached result. A byte-level BPE
    base (a ``tokenizer.json`` without ``tokenizer.model``) gets tokens and merges instead (``byte_level.py``;
    ``character_coverage`` and ``seed`` do not apply there).

    Old ids never move and appended pieces all contain a CJK character and score below every base
    piece, so text without CJK characters encodes exactly as with the base. ``revision`` applies to
    a hub base; the cache key hashes the base's bytes, so it needs no revision of its own.
    ``corpus_name`` names ``tc_texts`` in the warning given when they look Japanese, Korean or
    Simplified rather than Traditional Chinese (on cache hits too: the corpus is still wrong).
    """
    tc_texts = list(tc_texts)
    if isinstance(added_vocab, bool) or not isinstance(added_vocab, int) or added_vocab < 0:
        raise TokenizerConfigError(f"tokenizer.added_vocab={added_vocab!r}: expected an integer >= 0")
    if not 0.0 < character_coverage <= 1.0:
        raise TokenizerConfigError(f"tokenizer.character_coverage={character_coverage}: expected a value in (0, 1]")
    if added_vocab > 0 and not any(t.strip() for t in tc_texts):
        raise TokenizerConfigError(f"tokenizer.added_vocab={added_vocab} needs TC training text, got none")
    if added_vocab > 0:  # without extension the texts add no pieces
        warn_if_not_traditional_chinese(tc_texts, corpus_name)
    base_bytes, base_source = read_base_model(base, revision)
    options = {"character_coverage": character_coverage, "seed": seed}
    key = cache_key(base_bytes, tc_texts, added_vocab, options)
    root = Path(cache_dir) / "tokenizers"
    final = root / key
    with computed_once(final):  # DDP ranks and sweep jobs: the first builds it, the others wait and read it
        if (final / MANIFEST).is_file():
            return _result(final, json.loads((final / MANIFEST).read_text()), cached=True)
        return _build(final, key, base, base_bytes, base_source, tc_texts, added_vocab, options, num_threads)


def _build(
    final: Path,
    key: str,
    base,
    base_bytes: bytes,
    base_source: str,
    tc_texts: list[str],
    added_vocab: int,
    options: dict,
    num_threads: int | None,
) -> ExtendedTokenizer:
    if is_tokenizer_json(base_bytes):
        return _build_byte_level(final, key, base, base_bytes, base_source, tc_texts, added_vocab, options)
    base_proto = load_model_proto(base_bytes, base_source)
    check_base_supported(base_proto, base_source)
    record: dict = {}
    pieces: list[str] = []
    if added_vocab > 0:
        threads = num_threads or max(1, min(os.cpu_count() or 1, 8))
        pieces, record = choose_pieces(base_proto, tc_texts, added_vocab, num_threads=threads, **options)
    merged = append_pieces(base_proto, pieces)
    _check_spm_loads(merged)
    tokenizer = hf_tokenizer_from_proto(merged)
    manifest = {
        "cache_key": key,
        "code_version": CODE_VERSION,
        "base": str(base),
        "added_vocab": added_vocab,
        **options,
        "num_base": len(base_proto.pieces),
        "num_added": len(pieces),
        "num_new_chars": record.get("new_chars", 0),
        "vocab_size": len(merged.pieces),
        **{k: v for k, v in record.items() if k != "new_chars"},
    }
    _write_atomically(final.parent, final, merged, tokenizer, manifest)
    return _result(final, json.loads((final / MANIFEST).read_text()), cached=False)


def _build_byte_level(
    final: Path, key: str, base, base_bytes: bytes, base_source: str, tc_texts: list[str], added_vocab: int, options
) -> ExtendedTokenizer:
    """The byte-level BPE path (``byte_level.py``): new tokens and merges appended to the base's tokenizer.json, its
    special tokens and chat template kept from the base's tokenizer_config.json."""
    try:
        spec = json.loads(base_bytes)
    except json.JSONDecodeError as err:
        raise TokenizerConfigError(f"{base_source}: not valid JSON ({err})") from None
    extended, added = extend_byte_level(spec, tc_texts, added_vocab, source=base_source)
    settings = {}
    config_file = Path(base_source).with_name("tokenizer_config.json")
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
            value = config.get(name)
            settings[name] = value.get("content") if isinstance(value, dict) else value
    base_tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base_bytes.decode("utf-8")))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(extended)),
        **{k: v for k, v in settings.items() if v is not None},
    )
    manifest = {
        "cache_key": key,
        "code_version": CODE_VERSION,
        "base": str(base),
        "kind": "byte_level_bpe",
        "added_vocab": added_vocab,
        **options,
        "num_base": len(base_tokenizer),
        "num_added": len(added),
        "num_new_chars": sum(len(t) == 1 for t in map(whole_text, added)),
        "vocab_size": len(tokenizer),
    }
    _write_atomically(final.parent, final, None, tokenizer, manifest)
    return _result(final, json.loads((final / MANIFEST).read_text()), cached=False)


def _write_atomically(root: Path, final: Path, merged, tokenizer, manifest: dict) -> None:
    """Build in a private temp dir, then rename: a parallel job sees a complete directory or none. ``merged``: the
    SentencePiece model written beside the transformers files (None for a byte-level BPE tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        if merged is not None:
            (tmp / SP_MODEL_FILE).write_bytes(merged.SerializeToString())
        tokenizer.save_pretrained(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _result(path: Path, manifest: dict, cached: bool) -> ExtendedTokenizer:
    fields = {k: manifest[k] for k in ("num_base", "num_added", "num_new_chars", "vocab_size", "cache_key")}
    return ExtendedTokenizer(path=path, cached=cached, **fields)


__all__ = ["SP_MODEL_FILE", "ExtendedTokenizer", "extend_tokenizer", "load_tokenizer", "sentencepiece_matches"]
