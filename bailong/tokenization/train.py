"""Train a SentencePiece BPE model on Traditional Chinese text, in memory, with the base's settings.

The trained model is only a source of candidate pieces (see merge.py); what matters is that it
segments text the way the base would, so its splitting and normalisation options are copied from
the base ModelProto rather than left at SentencePiece's defaults.
"""
from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2


class TokenizerConfigError(ValueError):
    """Bad tokenizer-extension input: the message names the config key, the value and the valid range."""


WHITESPACE_PIECE = "\u2581"  # "▁": how SentencePiece writes a space

# Trainer options that decide how text is cut into pieces: the candidates must be cut like the base.
_SEGMENTATION_OPTIONS = (
    "split_by_unicode_script",
    "split_by_whitespace",
    "split_by_number",
    "split_digits",
    "treat_whitespace_as_suffix",
    "allow_whitespace_only_pieces",
    "max_sentencepiece_length",
)

# Meta pieces every trained model reserves: <unk>, <s>, </s> and the 256 byte pieces.
NUM_META_PIECES = 3 + 256


def load_model_proto(data: bytes, source: str = "tokenizer model") -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError, a private class
        raise TokenizerConfigError(f"{source}: not a SentencePiece model ({err})") from None
    if not proto.pieces:
        raise TokenizerConfigError(f"{source}: not a SentencePiece model (no pieces)")
    return proto


def check_base_supported(base: model_pb2.ModelProto, source: str) -> None:
    """The merge appends low-score BPE pieces; that only means something for a BPE base with byte fallback."""
    spec = base.trainer_spec
    if spec.model_type != model_pb2.TrainerSpec.BPE:
        kind = model_pb2.TrainerSpec.ModelType.Name(spec.model_type)
        raise TokenizerConfigError(f"{source}: base tokenizer is a {kind} SentencePiece model; extension needs BPE")
    if not spec.byte_fallback:
        raise TokenizerConfigError(
            f"{source}: base tokenizer has no byte fallback, so characters outside its vocabulary "
            "become <unk>; extension needs a byte-fallback (Llama-style) base"
        )


def max_sentence_bytes(base: model_pb2.ModelProto) -> int:
    return base.trainer_spec.max_sentence_length or 4192


def training_sentences(texts: Iterable[str], max_bytes: int) -> list[str]:
    """Documents → non-blank lines, each at most ``max_bytes`` UTF-8 bytes.

    SentencePiece silently skips sentences longer than max_sentence_length, and some TC documents
    (manuals) have lines far longer, so long lines are cut, preferably after a sentence end.
    """
    sentences: list[str] = []
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                # cut after the last sentence end or space in the head, if there is a reasonable one
                ends = [m.end() for m in re.finditer(r"[。！？；.!?;\s]", head)]
                cut = ends[-1] if ends and ends[-1] > len(head) // 2 else len(head)
                sentences.append(line[:cut])
                line = line[cut:]
            if line.strip():
                sentences.append(line)
    return sentences


def normalized_sentences(sentences: list[str], base: model_pb2.ModelProto) -> list[str]:
    """The sentences as SentencePiece's trainer sees them: the base's normaliser, "▁" for spaces."""
    return spm.SentencePieceProcessor(model_proto=base.SerializeToString()).normalize(sentences)


def required_characters(normalized: Iterable[str], coverage: float) -> list[str]:
    """The characters SentencePiece's trainer must keep, most frequent first.

    Mirrors trainer_interface.cc: count characters of the normalised sentences, sort by count
    (ties by code point), take them until the share of all occurrences covered reaches
    ``coverage``. A test checks it against the trainer.
    """
    counts: Counter[str] = Counter()
    for sentence in normalized:
        counts.update(sentence)
    counts.pop(" ", None)
    total = sum(counts.values())
    required: list[str] = []
    covered = 0
    for char, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= coverage * total:
            break
        covered += count
        required.append(char)
    return required


def trainer_options(base: model_pb2.ModelProto) -> dict:
    """SentencePiece trainer keyword options that reproduce the base's segmentation and normalisation."""
    spec, norm = base.trainer_spec, base.normalizer_spec
    options = {name: getattr(spec, name) for name in _SEGMENTATION_OPTIONS}
    if norm.precompiled_charsmap and norm.name not in ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"):
        raise TokenizerConfigError(f"base tokenizer uses a custom normaliser {norm.name!r}; cannot train alike")
    options.update(
        normalization_rule_name=norm.name or "identity",
        add_dummy_prefix=norm.add_dummy_prefix,
        remove_extra_whitespaces=norm.remove_extra_whitespaces,
        max_sentence_length=max_sentence_bytes(base),
        unk_id=spec.unk_id,
        bos_id=spec.bos_id,
        eos_id=spec.eos_id,
        pad_id=spec.pad_id,
        unk_piece=spec.unk_piece or "<unk>",
        bos_piece=spec.bos_piece or "<s>",
        eos_piece=spec.eos_piece or "</s>",
    )
    return options


def train_bpe(
    sentences: list[str],
    vocab_size: int,
    options: dict,
    *,
    character_coverage: float,
    seed: int = 0,
    num_threads: int = 2,
) -> model_pb2.ModelProto:
    """Train a byte-fallback BPE model in memory; returns at most ``vocab_size`` pieces.

    ``hard_vocab_limit=False`` lets a small corpus stop early (fewer pieces) instead of failing, so
    the caller learns how many pieces the corpus can supply.
    """
    if not sentences:
        raise TokenizerConfigError("tokenizer extension: the TC corpus has no non-blank text to train on")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            hard_vocab_limit=False,
            input_sentence_size=0,  # use every sentence: the TC corpus is small enough
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,
            **options,
        )
    except RuntimeError as err:
        raise TokenizerConfigError(
            f"SentencePiece training failed (vocab_size={vocab_size}, character_coverage={character_coverage}): {err}"
        ) from None
    return load_model_proto(model.getvalue(), "trained TC model")
