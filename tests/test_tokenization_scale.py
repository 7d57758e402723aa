"""Cutting long lines for the tokenizer trainer: linear work on multi-megabyte one-line documents, pieces as before."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bailong.tokenization import train
from bailong.tokenization.train import training_sentences

MAX_BYTES = 4192  # Llama's max_sentence_length


def _quadratic_reference(texts: list[str], max_bytes: int) -> list[str]:
    """The cutting before it was made linear (re-encodes the rest for every piece): the spec on small inputs."""
    sentences = []
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                ends = [m.end() for m in re.finditer(r"[。！？；.!?;\s]", head)]
                cut = ends[-1] if ends and ends[-1] > len(head) // 2 else len(head)
                sentences.append(line[:cut])
                line = line[cut:]
            if line.strip():
                sentences.append(line)
    return sentences


def test_a_4mb_one_line_document_is_encoded_at_most_twice(monkeypatch):
    # ~4 MB of TC manual-like text on one line: sentence ends, ASCII words, a 4-byte character
    unit = "天地玄黃，宇宙洪荒。日月盈昃，辰宿列張 install the package; 𠀋寒來暑往"
    line = unit * (4 * 2**20 // len(unit.encode("utf-8")) + 1)
    text = "first line\n" + line + "\nlast line"
    encoded_chars = 0

    def counting_utf8(piece: str) -> bytes:
        nonlocal encoded_chars
        encoded_chars += len(piece)
        return piece.encode("utf-8")

    monkeypatch.setattr(train, "_utf8", counting_utf8)
    sentences = training_sentences([text], MAX_BYTES)
    # the line once, plus each piece cut before its byte limit once: linear. Re-encoding the rest per
    # piece, as before, encodes ~1000x the line here (two encodes of the rest for each of ~1000 pieces).
    assert 0 < encoded_chars <= 2 * len(text)
    assert sentences[0] == "first line" and sentences[-1] == "last line"
    assert "".join(sentences[1:-1]) == line
    assert all(len(s.encode("utf-8")) <= MAX_BYTES for s in sentences)
    assert len(sentences) - 2 < 2 * len(line.encode("utf-8")) / MAX_BYTES  # pieces are over half full


_CHARS = st.sampled_from(list("ab c\t。！？；.!?;，天地玄黃\u3000\xa0é😀\U00020000\n\r\u2028"))


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(st.text(_CHARS, max_size=300), max_size=3), max_bytes=st.integers(4, 64))
def test_pieces_are_the_same_as_before_the_linear_rewrite(texts, max_bytes):
    assert training_sentences(texts, max_bytes) == _quadratic_reference(texts, max_bytes)


def test_a_limit_below_one_character_still_terminates():
    # the old loop cut nothing and spun forever; now the character goes alone, over the limit
    assert training_sentences(["😀😀a"], 2) == ["😀", "😀", "a"]
