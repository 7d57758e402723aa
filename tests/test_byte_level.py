"""Byte-level BPE extension (bailong/tokenization/byte_level.py) on a small GPT-2-style base trained here from
the data pack (mostly English, a few Han tokens, as Llama 3's vocabulary is), extended on Tang poems."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bailong.tokenization import TokenizerConfigError
from bailong.tokenization.byte_level import (
    extend_byte_level,
    has_cjk_lead_byte,
    kept_merges,
    learned_merges,
    token_bytes,
    whole_text,
)

ROOT = Path(__file__).resolve().parents[1]
ADDED = 300


def lines(name: str, start: int, count: int) -> list[str]:
    with gzip.open(ROOT / "data" / name, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[start : start + count]


@pytest.fixture(scope="module")
def base_spec() -> dict:
    """A byte-level BPE base: 2,000 tokens learned on KJV verses, fortunes and a little modern Chinese."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    texts = (
        lines("en/kjv.jsonl.gz", 0, 3000) + lines("en/fortunes.jsonl.gz", 0, 500) + lines("zh_tw/modern.jsonl.gz", 0, 5)
    )
    tokenizer.train_from_iterator(texts, trainer)
    return json.loads(tokenizer.to_str())


# Latin text the base splits into pieces, mixed into the TC training text (as web text mixes it): the learner finds
# merges for it too, which must not be kept (they would change how such text encodes)
MIXED_IN = "xqzv xqzv résumé café naïve Zürich São"


@pytest.fixture(scope="module")
def extended(base_spec):
    texts = lines("zh_tw/poetry_tang.jsonl.gz", 0, 400) + [MIXED_IN] * 200
    spec, added = extend_byte_level(base_spec, texts, ADDED)
    return (
        Tokenizer.from_str(json.dumps(base_spec)),
        Tokenizer.from_str(json.dumps(spec)),
        spec,
        added,
    )


def held_out_non_cjk() -> list[str]:
    code = (ROOT / "bailong" / "tokenization" / "byte_level.py").read_text(encoding="utf-8")
    code = "".join(ch for ch in code if not 0x3000 <= ord(ch) <= 0x9FFF)
    held_out = lines("en/kjv.jsonl.gz", 20000, 200) + lines("en/fortunes.jsonl.gz", 2000, 100) + code.split("\n\n")
    return held_out + [MIXED_IN, "Xqzv and the résumé of a café in Zürich"]


def test_base_ids_and_merges_are_kept_and_the_new_ones_appended(base_spec, extended):
    _, _, spec, added = extended
    base_vocab, vocab = base_spec["model"]["vocab"], spec["model"]["vocab"]
    assert len(added) == ADDED and len(set(added)) == ADDED
    assert all(vocab[token] == i for token, i in base_vocab.items())
    first = 1 + max([*base_vocab.values(), *(t["id"] for t in base_spec["added_tokens"])])
    assert [vocab[token] for token in added] == list(range(first, first + ADDED))
    base_merges = base_spec["model"]["merges"]
    assert spec["model"]["merges"][: len(base_merges)] == base_merges
    new_merges = spec["model"]["merges"][len(base_merges) :]
    assert ["".join(m) for m in new_merges] == added
    known = set(base_vocab)
    for left, right in new_merges:  # each built from tokens that exist by then, each with a CJK lead byte
        assert left in known and right in known and has_cjk_lead_byte(left + right)
        known.add(left + right)


def test_text_without_cjk_encodes_exactly_as_before(extended):
    base, ext, _, _ = extended
    for text in held_out_non_cjk():
        assert ext.encode(text).ids == base.encode(text).ids


# anything but U+3000–U+9FFF (and surrogates, which UTF-8 cannot carry)
non_cjk_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=None).filter(
        lambda ch: not 0x3000 <= ord(ch) <= 0x9FFF
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=non_cjk_text)
def test_property_non_cjk_ids_unchanged_and_any_text_round_trips(extended, text):
    base, ext, _, _ = extended
    assert ext.encode(text).ids == base.encode(text).ids
    assert ext.decode(ext.encode(text).ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",))))
def test_property_any_text_round_trips(extended, text):
    _, ext, _, _ = extended
    assert ext.decode(ext.encode(text).ids) == text


def test_traditional_chinese_gets_fewer_tokens_and_round_trips(extended):
    base, ext, _, added = extended
    held_out = lines("zh_tw/poetry_tang.jsonl.gz", 5000, 100)
    chars = sum(len(t) for t in held_out)
    before = sum(len(base.encode(t).ids) for t in held_out) / chars
    after = sum(len(ext.encode(t).ids) for t in held_out) / chars
    assert after < 0.8 * before, (before, after)
    assert all(ext.decode(ext.encode(t).ids) == t for t in held_out)
    # the learner builds characters from their bytes: some new tokens are byte pieces of a character (merge parts),
    # the others whole characters or words (measured: 155 of 300)
    whole = [t for t in added if token_bytes(t).decode("utf-8", errors="replace").count("\ufffd") == 0]
    assert ADDED // 3 <= len(whole) < ADDED


def test_saved_extension_loads_with_autotokenizer(extended, tmp_path):
    _, ext, _, _ = extended
    PreTrainedTokenizerFast(tokenizer_object=ext, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "床前明月光，疑是地上霜。 And the LORD spake unto Moses."
    assert loaded(text, add_special_tokens=False)["input_ids"] == ext.encode(text).ids
    assert loaded.decode(ext.encode(text).ids) == text


def test_the_base_is_not_modified_and_zero_adds_nothing(base_spec):
    before = json.dumps(base_spec)
    spec, added = extend_byte_level(base_spec, ["臺灣"], 0)
    assert added == [] and json.dumps(spec) == before == json.dumps(base_spec)


def test_the_search_grows_until_enough_merges_pass_and_a_short_supply_is_refused(base_spec):
    """Many learned merges are base tokens or not CJK: a search of ``added_vocab`` merges (factor 1) keeps fewer, so
    it grows; a text that holds fewer new merges than asked is refused with what it can supply."""
    texts = lines("zh_tw/poetry_tang.jsonl.gz", 0, 400)
    first = kept_merges(learned_merges(base_spec, texts, 256 + 100), base_spec["model"]["vocab"], 100)
    assert len(first) < 100  # the first search alone is short
    _, added = extend_byte_level(base_spec, texts, 100, search_factor=1)
    assert len(added) == 100
    with pytest.raises(TokenizerConfigError, match=r"added_vocab=50 is larger than the TC corpus can supply.*1\.\.\d"):
        extend_byte_level(base_spec, ["臺灣高雄"] * 3, 50)


def test_unsupported_tokenizers_are_refused_by_name(base_spec):
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerConfigError, match="a WordPiece tokenizer; extension supports BPE only"):
        extend_byte_level(json.loads(wordpiece.to_str()), ["臺灣"], 8, source="wp/tokenizer.json")
    unigram = Tokenizer(models.Unigram([("a", -1.0), ("<unk>", -2.0)], unk_id=1))
    with pytest.raises(TokenizerConfigError, match="a Unigram tokenizer"):
        extend_byte_level(json.loads(unigram.to_str()), ["臺灣"], 8)
    no_byte_level = json.loads(json.dumps(base_spec))
    no_byte_level["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(TokenizerConfigError, match="without a ByteLevel pre-tokenizer"):
        extend_byte_level(no_byte_level, ["臺灣"], 8)
    suffixed = json.loads(json.dumps(base_spec))
    suffixed["model"]["end_of_word_suffix"] = "</w>"
    with pytest.raises(TokenizerConfigError, match=r"model.end_of_word_suffix='</w>'"):
        extend_byte_level(suffixed, ["臺灣"], 8)


def test_the_stage_extends_a_byte_level_base_directory_cached_and_spelled_for_init(base_spec, tmp_path):
    """``extend_tokenizer`` on a directory holding only tokenizer.json (as Llama 3's): the same tokens as
    ``extend_byte_level``, the base's special tokens kept, cached by input hash, and every new token spelled in base
    ids whose bytes are its own (what the init strategies average over)."""
    from bailong.embedding.pieces import find_new_tokens
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    base_dir = tmp_path / "bbpe-base"
    base_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(base_spec)))
    base_tok.eos_token = "<|endoftext|>"
    base_tok.save_pretrained(base_dir)
    (base_dir / "tokenizer.model").unlink(missing_ok=True)
    texts = lines("zh_tw/poetry_tang.jsonl.gz", 0, 400)
    result = extend_tokenizer(base_dir, texts, 120, tmp_path / "cache")
    assert not result.cached and result.num_added == 120 and result.vocab_size == result.num_base + 120
    assert not (result.path / "tokenizer.model").exists()
    again = extend_tokenizer(base_dir, texts, 120, tmp_path / "cache")
    assert again.cached and again.path == result.path
    _, expected = extend_byte_level(base_spec, texts, 120)
    tok = load_tokenizer(result.path)
    assert tok.convert_ids_to_tokens(list(range(result.num_base, result.vocab_size))) == expected
    assert tok.eos_token == "<|endoftext|>"
    plain = load_tokenizer(extend_tokenizer(base_dir, [], 0, tmp_path / "cache").path)
    new = find_new_tokens(plain, tok)
    assert new.num_base == result.num_base and new.num_new == 120
    for piece, spelled in zip(new.pieces, new.base_pieces):
        assert len(spelled) >= 2 and b"".join(token_bytes(plain.convert_ids_to_tokens(i)) for i in spelled) == (
            token_bytes(piece)
        )
    assert result.num_new_chars == sum(len(whole_text(p)) == 1 for p in expected) > 0
    text = "春眠不覺曉，處處聞啼鳥。 In the beginning God created the heaven and the earth."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# the pre-tokenizer patterns of Llama 3's and Qwen 2's tokenizer.json (digits in runs of 1-3, resp. one by one)
WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = WORDS + r"\p{N}{1,3}" + REST
QWEN2_SPLIT = WORDS + r"\p{N}" + REST


@pytest.mark.parametrize("layout", ["llama3", "qwen2"])
def test_llama3_and_qwen_layouts_extend_through_the_stage(layout, tmp_path):
    """``model=llama3_8b`` / ``model=qwen2_5_7b`` take this path: their tokenizer.json layouts (Split regex then
    ByteLevel without its own regex; Llama 3 with ignore_merges, Qwen with an NFC normaliser and special tokens
    after the vocabulary), built locally, extend with English ids unchanged and new ids after the special ones."""
    from tokenizers import Regex, normalizers

    from bailong.tokenization import extend_tokenizer, load_tokenizer

    tokenizer = Tokenizer(models.BPE(ignore_merges=layout == "llama3"))
    if layout == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    pattern = LLAMA3_SPLIT if layout == "llama3" else QWEN2_SPLIT
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(lines("en/kjv.jsonl.gz", 0, 2000) + lines("zh_tw/modern.jsonl.gz", 0, 3), trainer)
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])  # ids after the vocabulary, as both have
    base_dir = tmp_path / layout
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end_of_text|>").save_pretrained(base_dir)
    result = extend_tokenizer(base_dir, lines("zh_tw/poetry_tang.jsonl.gz", 0, 300), 100, tmp_path / "cache")
    base, ext = load_tokenizer(extend_tokenizer(base_dir, [], 0, tmp_path / "cache").path), load_tokenizer(result.path)
    assert result.num_added == 100 and result.num_base == len(base) == tokenizer.get_vocab_size()
    assert ext.convert_tokens_to_ids("<|end_of_text|>") == base.convert_tokens_to_ids("<|end_of_text|>")
    for text in held_out_non_cjk()[:200] + ["Call 0912-345-678 before 2025", "naïve résumé"]:
        assert ext(text, add_special_tokens=False)["input_ids"] == base(text, add_special_tokens=False)["input_ids"]
    poem = lines("zh_tw/poetry_tang.jsonl.gz", 5000, 1)[0]
    ids = ext(poem, add_special_tokens=False)["input_ids"]
    assert ext.decode(ids) == poem and len(ids) < len(base(poem, add_special_tokens=False)["input_ids"])
