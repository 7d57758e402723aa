"""Train a SentencePiece BPE model on Traditional Chinese text, in memory, with the base's settings.

The trained model is only a source of candidate pieces (see merge.py); what matters is that it
segments text the way the base would, so its splitting and normalisation options are copied from
the base ModelProto rather than left at SentencePiece's defaults.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

log = logging.getLogger(__name__)


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
    except Exception as err:  # noqa: BLE001  protobuf raises DecodeError, a private class
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


# Where a long line is preferably cut: after a sentence end or a space.
_CUT_AFTER = re.compile(r"[。！？；.!?;\s]")


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8; the splitter encodes only through here, so a test can count how much it encodes."""
    return text.encode("utf-8")


def training_sentences(texts: Iterable[str], max_bytes: int) -> list[str]:
    """Documents → non-blank lines, each at most ``max_bytes`` UTF-8 bytes.

    SentencePiece silently skips sentences longer than max_sentence_length, and some TC documents
    (manuals) have lines far longer, so long lines are cut, preferably after a sentence end.
    """
    sentences: list[str] = []
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                sentences += byte_limited_pieces(line, max_bytes)
    return sentences


def byte_limited_pieces(line: str, max_bytes: int) -> list[str]:
    """``line`` cut into consecutive pieces of at most ``max_bytes`` UTF-8 bytes; a blank last piece is dropped.

    Each piece is the longest run of whole characters that fits, cut back to just after its last
    sentence end or space if that lies in its second half. The line is encoded once and walked by
    byte offset, so the work is linear in its length (re-encoding the rest for every piece was
    quadratic: a 50 MB one-line document took minutes).
    """
    data = _utf8(line)
    pieces: list[str] = []
    start = 0  # byte offset of the uncut rest, always on a character boundary ...
    start_char = 0  # ... and the same place in characters
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while end > start and data[end] & 0xC0 == 0x80:  # back off a character cut in two
            end -= 1
        head = data[start:end].decode("utf-8")
        ends = [m.end() for m in _CUT_AFTER.finditer(head)]
        cut = ends[-1] if ends and ends[-1] > len(head) // 2 else len(head)
        if cut == len(head) and head:
            piece, size = head, end - start
        else:
            # an empty head means max_bytes is below one character's width: emitting that character
            # (over the limit) beats cutting nothing forever
            piece = head[:cut] or data[start : start + 4].decode("utf-8", "ignore")[:1]
            size = len(_utf8(piece))
        pieces.append(piece)
        start += size
        start_char += len(piece)
    rest = line[start_char:]
    if rest.strip():
        pieces.append(rest)
    return pieces


# Letters of the CJK scripts, by Unicode block; punctuation and marks the scripts share (・, ゛) are left
# out. Han and Bopomofo (注音, used in Taiwan) belong in a TC corpus; kana and Hangul do not.
CJK_SCRIPT_LETTERS = {
    "Han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f",
    "Bopomofo": "\u3105-\u312f\u31a0-\u31bf",
    "kana": "\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9d",
    "Hangul": "\u1100-\u11ff\u3131-\u318e\ua960-\ua97f\uac00-\ud7ff\uffa0-\uffdc",
}
NOT_TC_SCRIPTS = ("kana", "Hangul")
# Warn when more of the CJK letters than this are kana or Hangul: TC text quoting a Japanese or Korean
# name stays far below, a corpus with Japanese or Korean documents mixed in does not.
NOT_TC_SCRIPT_WARN_SHARE = 0.01
# Frequent Simplified-only characters (這們說時… in Traditional; Japanese writes neither form). They are
# 5.8-7% of the Han characters of Simplified text (measured on vim's and GnuPG's zh_CN help), under
# 0.001% of this project's TC corpora (a few in quotations): a share over the threshold means Simplified
# documents.
SIMPLIFIED_MARKERS = "这们说时对发过还经见问长东车开关门边现样让论书话进动头买卖认设个为"
SIMPLIFIED_WARN_SHARE = 0.005  # of the Han characters

_HAN_RUNS = re.compile(f"[{CJK_SCRIPT_LETTERS['Han']}]+")  # counted by runs: fewer matches, 2-3x faster
_SCRIPTS = {name: re.compile(f"[{chars}]") for name, chars in CJK_SCRIPT_LETTERS.items() if name != "Han"}
_SIMPLIFIED = re.compile(f"[{SIMPLIFIED_MARKERS}]")
_RARE = re.compile(f"[{''.join(CJK_SCRIPT_LETTERS[n] for n in _SCRIPTS)}{SIMPLIFIED_MARKERS}]")


def cjk_script_counts(texts: Iterable[str]) -> tuple[Counter[str], Counter[str], dict[str, tuple[int, str]]]:
    """Letters per CJK script in ``texts``, Simplified-only characters each, and where each first occurs.

    The last maps a script (or "Simplified") to (document index, the text around its first letter).
    Only documents holding a letter other than Han are counted letter by letter: a clean TC corpus
    costs two regex scans per document.
    """
    scripts: Counter[str] = Counter({name: 0 for name in CJK_SCRIPT_LETTERS})
    simplified: Counter[str] = Counter()
    examples: dict[str, tuple[int, str]] = {}
    for index, text in enumerate(texts):
        scripts["Han"] += sum(map(len, _HAN_RUNS.findall(text)))
        if not _RARE.search(text):
            continue
        for name, pattern in (*_SCRIPTS.items(), ("Simplified", _SIMPLIFIED)):
            found = pattern.findall(text)
            if not found:
                continue
            if name == "Simplified":
                simplified.update(found)
            else:
                scripts[name] += len(found)
            if name not in examples:
                at = pattern.search(text).start()
                examples[name] = (index, text[max(0, at - 15) : at + 15])
    return scripts, simplified, examples


def warn_if_not_traditional_chinese(texts: Iterable[str], corpus_name: str) -> list[str]:
    """Log (and return) a warning for each sign that the TC corpus ``corpus_name`` is not Traditional Chinese.

    The extension appends pieces for whatever the corpus holds: Japanese kana, Hangul or Simplified
    characters in it become "TC" pieces. Warns when kana and Hangul are over NOT_TC_SCRIPT_WARN_SHARE
    of the CJK letters, or Simplified-only characters over SIMPLIFIED_WARN_SHARE of the Han characters.
    """
    scripts, simplified, examples = cjk_script_counts(texts)
    letters = sum(scripts.values())
    foreign = sum(scripts[name] for name in NOT_TC_SCRIPTS)
    warnings = []

    def example(names) -> str:
        index, snippet = min(examples[name] for name in names if name in examples)
        return f"first in document {index}: {snippet!r}"

    if letters and foreign / letters > NOT_TC_SCRIPT_WARN_SHARE:
        counts = ", ".join(f"{name} {scripts[name]:,}" for name in CJK_SCRIPT_LETTERS)
        warnings.append(
            f"{corpus_name}: {foreign / letters:.1%} of the CJK letters in the TC corpus are not Han or Bopomofo "
            f"({counts}; {example(NOT_TC_SCRIPTS)}). The tokenizer extension would append kana/Hangul as TC "
            f"pieces. Check {corpus_name}: the TC corpus should be Traditional Chinese; leave Japanese and "
            f"Korean documents out (this warning fires above {NOT_TC_SCRIPT_WARN_SHARE:.0%} of the CJK letters)."
        )
    num_simplified = sum(simplified.values())
    if scripts["Han"] and num_simplified / scripts["Han"] > SIMPLIFIED_WARN_SHARE:
        top = ", ".join(f"{char} {count:,}" for char, count in simplified.most_common(5))
        warnings.append(
            f"{corpus_name}: {num_simplified / scripts['Han']:.1%} of the Han characters in the TC corpus are "
            f"Simplified-only forms ({top}; of {scripts['Han']:,} Han; {example(['Simplified'])}). The tokenizer "
            f"extension would append Simplified characters as TC pieces. Check {corpus_name}: the TC corpus "
            f"should be Traditional Chinese; convert Simplified text (e.g. OpenCC s2tw) or leave it out (this "
            f"warning fires above {SIMPLIFIED_WARN_SHARE:.1%} of the Han characters)."
        )
    for message in warnings:
        log.warning(message)
    return warnings


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
