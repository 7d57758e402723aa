"""Choose CJK pieces from a trained TC model and append them to the base ModelProto.

Two rules keep the base's behaviour on text it already covers:
only pieces containing a CJK character are appended, so no appended piece can match text without
one; and appended pieces score below every base piece, so a base merge always wins over a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as model_pb2

NORMAL = model_pb2.ModelProto.SentencePiece.NORMAL

# Unicode blocks of Han ideographs and of the punctuation, symbols and phonetic scripts that travel
# with Chinese text (full-width forms, bopomofo, kana). ASCII and Latin text never contains them.
_CJK_RANGES = (
    (0x2E80, 0x2FDF),  # CJK radicals supplement, Kangxi radicals
    (0x2FF0, 0x2FFF),  # ideographic description characters
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」…)
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3100, 0x312F),  # bopomofo
    (0x31A0, 0x31FF),  # bopomofo extended, CJK strokes, katakana extensions
    (0x3200, 0x33FF),  # enclosed CJK letters, CJK compatibility
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # halfwidth and fullwidth forms (，！？（）)
    (0x20000, 0x3FFFF),  # CJK unified ideographs extensions B-I, compatibility supplement
)


def is_cjk_char(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def contains_cjk(piece: str) -> bool:
    return any(is_cjk_char(c) for c in piece)


def normal_pieces(proto: model_pb2.ModelProto) -> list[model_pb2.ModelProto.SentencePiece]:
    return [p for p in proto.pieces if p.type == NORMAL]


def _reachable(piece: str, vocab: set[str]) -> bool:
    """BPE only produces a piece by merging two pieces already in the vocabulary."""
    return any(piece[:i] in vocab and piece[i:] in vocab for i in range(1, len(piece)))


def new_characters(required: Iterable[str], base: model_pb2.ModelProto) -> list[str]:
    """Required CJK characters the base lacks (they fall back to bytes there), in the given order."""
    base_pieces = {p.piece for p in base.pieces}
    return [c for c in required if is_cjk_char(c) and c not in base_pieces]


def candidate_pieces(base: model_pb2.ModelProto, trained: model_pb2.ModelProto, new_chars: Sequence[str]) -> list[str]:
    """Pieces to append, best first: the new required characters, then multi-character CJK pieces.

    Characters come first because a multi-character piece is unreachable while one of its
    characters is missing (that character becomes byte pieces). Multi-character pieces keep the
    trained model's merge order and are kept only if two pieces already chosen or in the base
    merge into them.
    """
    vocab = {p.piece for p in base.pieces}
    chosen = list(dict.fromkeys(new_chars))
    vocab.update(chosen)
    for p in normal_pieces(trained):
        piece = p.piece
        if len(piece) < 2 or piece in vocab or not contains_cjk(piece):
            continue
        if _reachable(piece, vocab):
            chosen.append(piece)
            vocab.add(piece)
    return chosen


def scores_below(lowest: float, count: int) -> list[float]:
    """``count`` strictly decreasing float32 scores, all below ``lowest``.

    SentencePiece stores scores as float32 and a base may already use very low ones (Mistral's
    whitespace pieces score -1e9, where float32 steps are 64), so step down one float32 at a time.
    """
    scores = np.empty(count, dtype=np.float32)
    current = np.float32(lowest)
    for i in range(count):
        current = np.nextafter(current, np.float32(-np.inf))
        scores[i] = current
    return scores.tolist()


def append_pieces(base: model_pb2.ModelProto, pieces: Sequence[str]) -> model_pb2.ModelProto:
    """A copy of ``base`` with ``pieces`` appended as NORMAL pieces that score below every base piece."""
    existing = {p.piece for p in base.pieces}
    duplicates = [p for p in pieces if p in existing]
    if duplicates or len(set(pieces)) != len(pieces):
        raise ValueError(f"pieces to append must be new and distinct; repeated: {duplicates[:5]}")
    merged = model_pb2.ModelProto()
    merged.CopyFrom(base)
    lowest = min(p.score for p in base.pieces)
    for piece, score in zip(pieces, scores_below(lowest, len(pieces))):
        merged.pieces.add(piece=piece, score=score, type=NORMAL)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged
