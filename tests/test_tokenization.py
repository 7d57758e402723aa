"""Tokenizer extension on the real 32k Llama-2-layout base (mistral-v1) and a few hundred real documents."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents, split_documents
from bailong.tokenization import TokenizerConfigError, extend_tokenizer, load_tokenizer, tokens_per_char
from bailong.tokenization.merge import contains_cjk, new_characters, scores_below
from bailong.tokenization.train import (
    cjk_script_counts,
    load_model_proto,
    normalized_sentences,
    required_characters,
    train_bpe,
    trainer_options,
    training_sentences,
    warn_if_not_traditional_chinese,
)

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = ROOT / "data" / "tokenizers" / "mistral-v1.model"
EXTRA = 300  # multi-character pieces asked for beyond the required new characters


def _docs(*specs):
    return load_documents([CorpusConfig(path=str(ROOT / "data" / p), max_docs=n) for p, n in specs])


@pytest.fixture(scope="module")
def corpora():
    tc = _docs(("zh_tw/poetry_tang.jsonl.gz", 400), ("zh_tw/classics.jsonl.gz", 40), ("zh_tw/modern.jsonl.gz", 12))
    en = _docs(("en/fortunes.jsonl.gz", 1000), ("en/kjv.jsonl.gz", 30))
    tc_train, tc_val = split_documents(tc, 0.1, seed=0)
    _, en_val = split_documents(en, 0.3, seed=0)
    return {"tc_train": tc_train, "tc_val": tc_val, "en_val": en_val}


@pytest.fixture(scope="module")
def base_proto():
    return load_model_proto(BASE_MODEL.read_bytes())


@pytest.fixture(scope="module")
def min_added(corpora, base_proto):
    """Required new characters of the training corpus: the smallest valid added_vocab."""
    sentences = training_sentences(corpora["tc_train"], base_proto.trainer_spec.max_sentence_length)
    return len(new_characters(required_characters(normalized_sentences(sentences, base_proto), 0.9995), base_proto))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def extended(corpora, min_added, cache_dir):
    return extend_tokenizer(BASE_MODEL, corpora["tc_train"], min_added + EXTRA, cache_dir)


@pytest.fixture(scope="module")
def plain(cache_dir):
    """added_vocab=0: the base itself as a transformers tokenizer, the reference for "as before"."""
    return extend_tokenizer(BASE_MODEL, [], 0, cache_dir)


@pytest.fixture(scope="module")
def tok(extended):
    return load_tokenizer(extended.path)


@pytest.fixture(scope="module")
def base_tok(plain):
    return load_tokenizer(plain.path)


@pytest.fixture(scope="module")
def merged_proto(extended):
    return load_model_proto((extended.path / "tokenizer.model").read_bytes())


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ---- ids and pieces ------------------------------------------------------------------------


def test_every_base_id_keeps_its_piece_and_score(extended, merged_proto, base_proto, tok):
    assert extended.num_base == len(base_proto.pieces) == 32000
    vocab = tok.get_vocab()
    for i, piece in enumerate(base_proto.pieces):
        kept = merged_proto.pieces[i]
        assert (kept.piece, kept.type, kept.score) == (piece.piece, piece.type, piece.score), i
        assert vocab[piece.piece] == i
    assert merged_proto.normalizer_spec == base_proto.normalizer_spec


def test_new_ids_are_appended_contiguously(extended, merged_proto, tok, min_added):
    assert extended.num_added == min_added + EXTRA
    assert extended.vocab_size == len(merged_proto.pieces) == len(tok) == 32000 + extended.num_added
    added = [p.piece for p in merged_proto.pieces[32000:]]
    assert tok.convert_ids_to_tokens(list(range(32000, extended.vocab_size))) == added
    assert len(set(added)) == len(added)


def test_only_cjk_pieces_are_added_characters_first_and_scored_below_the_base(
    extended, merged_proto, base_proto, min_added
):
    added = list(merged_proto.pieces[32000:])
    assert all(contains_cjk(p.piece) for p in added)
    assert extended.num_new_chars == min_added
    assert all(len(p.piece) == 1 for p in added[:min_added])
    assert all(len(p.piece) > 1 for p in added[min_added:])
    lowest_base = min(p.score for p in base_proto.pieces)
    scores = [p.score for p in added]
    assert scores[0] < lowest_base
    assert all(a > b for a, b in zip(scores, scores[1:]))


def test_every_added_piece_is_reachable_and_most_are_used(extended, merged_proto, tok, corpora):
    vocab = {p.piece for p in merged_proto.pieces[:32000]}
    for p in merged_proto.pieces[32000:]:
        piece = p.piece
        assert len(piece) == 1 or any(piece[:k] in vocab and piece[k:] in vocab for k in range(1, len(piece))), piece
        vocab.add(piece)
    # BPE with the base's merges first may still route around a new piece: most must survive that
    first_multi = 32000 + extended.num_new_chars
    used_in_train = {i for text in corpora["tc_train"] for i in _ids(tok, text) if i >= first_multi}
    assert len(used_in_train) >= 0.9 * EXTRA
    used_in_val = {i for text in corpora["tc_val"] for i in _ids(tok, text) if i >= first_multi}
    assert len(used_in_val) >= 20


def test_scores_below_steps_down_in_float32_even_at_minus_1e9():
    scores = scores_below(-1e9, 3)
    assert scores[0] < -1e9 and scores[0] > scores[1] > scores[2]


# ---- English is untouched --------------------------------------------------------------------


def test_english_validation_tokenizes_exactly_as_before(tok, base_tok, corpora, extended, plain):
    en_val = corpora["en_val"]
    assert len(en_val) > 250
    for text in en_val:
        assert _ids(tok, text) == _ids(base_tok, text)
    base_sp = spm.SentencePieceProcessor(model_file=str(plain.path / "tokenizer.model"))
    merged_sp = spm.SentencePieceProcessor(model_file=str(extended.path / "tokenizer.model"))
    assert merged_sp.encode(en_val) == base_sp.encode(en_val)


ASCII_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\n\t"))
ENGLISH_WORDS = ["the", "LORD", "said", "unto", "Moses", "fortune", "Debian", "shell", "don't", "42", "x86_64"]
ENGLISH_TEXT = st.lists(
    st.tuples(st.sampled_from(ENGLISH_WORDS), st.sampled_from([" ", "  ", ", ", ".\n", "\t", "-"])), max_size=30
).map(lambda pairs: "".join(w + sep for w, sep in pairs))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(ASCII_TEXT, ENGLISH_TEXT))
def test_property_ascii_and_english_text_tokenizes_as_before(tok, base_tok, text):
    assert _ids(tok, text) == _ids(base_tok, text)


# ---- faithful transformers tokenizer ---------------------------------------------------------

EDGE_TEXTS = [
    " leading space",
    "  two leading",
    "trailing  ",
    "a\n\n  b\t\tc",
    "中文 English 混排",
    "　全形空白",
    "",
    " ",
]


def test_decode_encode_round_trips_tc_and_en_validation_text(tok, base_tok, corpora):
    texts = corpora["tc_val"] + corpora["en_val"] + EDGE_TEXTS
    for tokenizer in (tok, base_tok):
        for text in texts:
            assert tokenizer.decode(_ids(tokenizer, text)) == text


def test_transformers_tokenizer_encodes_as_the_sentencepiece_model(tok, extended, corpora):
    sp = spm.SentencePieceProcessor(model_file=str(extended.path / "tokenizer.model"))
    texts = corpora["tc_val"] + corpora["en_val"][:100] + EDGE_TEXTS
    assert [_ids(tok, t) for t in texts] == sp.encode(texts)


def test_saved_directory_loads_with_autotokenizer_and_adds_bos(extended):
    assert (extended.path / "tokenizer.model").is_file()
    auto = AutoTokenizer.from_pretrained(str(extended.path))
    assert len(auto) == extended.vocab_size
    ids = auto("春眠不覺曉")["input_ids"]
    assert ids[0] == auto.bos_token_id == 1 and auto.eos_token_id == 2
    assert ids[1:] == _ids(auto, "春眠不覺曉")


def test_tc_fertility_drops_and_english_stays(tok, base_tok, corpora):
    tc_before, tc_after = tokens_per_char(base_tok, corpora["tc_val"]), tokens_per_char(tok, corpora["tc_val"])
    assert tc_after < 0.8 * tc_before
    assert tokens_per_char(tok, corpora["en_val"]) == tokens_per_char(base_tok, corpora["en_val"])


def test_tokens_per_char_counts_tokens_without_specials(base_tok):
    assert tokens_per_char(base_tok, ["ab", "cd"]) == len(_ids(base_tok, "ab") + _ids(base_tok, "cd")) / 4
    with pytest.raises(ValueError, match="empty"):
        tokens_per_char(base_tok, [""])


# ---- training details ------------------------------------------------------------------------


def test_required_characters_match_what_sentencepiece_keeps(corpora, base_proto):
    sentences = training_sentences(corpora["tc_train"][:150], 4192)
    trained = train_bpe(sentences, 4000, trainer_options(base_proto), character_coverage=0.999)
    kept = {p.piece for p in trained.pieces if p.type == 1 and len(p.piece) == 1}
    assert set(required_characters(normalized_sentences(sentences, base_proto), 0.999)) == kept


def test_long_lines_are_cut_under_the_byte_limit_without_losing_text():
    line = "天地玄黃，宇宙洪荒。" * 300 + "end"
    sentences = training_sentences(["first\n\n" + line], max_bytes=500)
    assert sentences[0] == "first"
    assert all(len(s.encode("utf-8")) <= 500 for s in sentences)
    assert "".join(sentences[1:]) == line


# ---- the TC corpus's script ------------------------------------------------------------------

JAPANESE = "これは日本語の文章です。カタカナのテキストもあります。"
KOREAN = "이것은 한국어 문장입니다."
SIMPLIFIED = "这是一个简体中文的句子，我们说的话都在这里。"


def _count(texts, *ranges):
    """Characters of ``texts`` in the code point ranges: an independent count to check the census by."""
    return sum(any(lo <= ord(c) <= hi for lo, hi in ranges) for text in texts for c in text)


HAN_RANGES = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F)]


def test_kana_and_hangul_in_the_tc_corpus_are_warned_about_with_their_share(corpora, caplog):
    texts = corpora["tc_train"][:20] + [JAPANESE * 50, KOREAN * 20]
    kana, hangul = _count(texts, (0x3041, 0x30FA)), _count(texts, (0xAC00, 0xD7A3))
    han = _count(texts, *HAN_RANGES)
    share = (kana + hangul) / (kana + hangul + han)
    assert share > 0.01 and kana and hangul
    with caplog.at_level(logging.WARNING, logger="bailong.tokenization.train"):
        warnings = warn_if_not_traditional_chinese(texts, "data.tc (train split)")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == warnings
    [message] = warnings
    assert message.startswith(f"data.tc (train split): {share:.1%} of the CJK letters in the TC corpus are not Han")
    assert f"Han {han:,}, Bopomofo 0, kana {kana:,}, Hangul {hangul:,}" in message
    assert "first in document 20: " in message and "Check data.tc (train split)" in message


def test_a_clean_tc_corpus_gives_no_script_warning(corpora, caplog):
    # a Japanese brand in katakana and Bopomofo (注音, Taiwan's phonetic script) belong in TC text
    texts = corpora["tc_train"] + ["我在東京買了ソニー的相機。注音符號：ㄅㄆㄇㄈ。"]
    with caplog.at_level(logging.WARNING, logger="bailong.tokenization.train"):
        assert warn_if_not_traditional_chinese(texts, "data.tc (train split)") == []
    assert not caplog.records
    scripts, _, _ = cjk_script_counts(texts)
    assert (scripts["kana"], scripts["Bopomofo"]) == (len("ソニー"), len("ㄅㄆㄇㄈ"))  # the corpus itself has none
    assert scripts["Han"] == _count(texts, *HAN_RANGES)


def test_simplified_chinese_in_the_tc_corpus_is_warned_about(corpora, caplog):
    texts = corpora["tc_train"][:20] + [SIMPLIFIED * 30]
    with caplog.at_level(logging.WARNING, logger="bailong.tokenization.train"):
        [message] = warn_if_not_traditional_chinese(texts, "data.tc (train split)")
    most_frequent = f"(这 {SIMPLIFIED.count('这') * 30}, "
    assert f"of the Han characters in the TC corpus are Simplified-only forms {most_frequent}" in message
    assert "first in document 20: " in message and "OpenCC" in message
    assert [r.getMessage() for r in caplog.records] == [message]


def test_extension_warns_about_a_japanese_tc_corpus_only_when_it_adds_pieces(corpora, tmp_path, caplog):
    texts = corpora["tc_train"][:20] + [JAPANESE * 50]
    with caplog.at_level(logging.WARNING, logger="bailong.tokenization.train"):
        extend_tokenizer(BASE_MODEL, texts, 0, tmp_path)
        assert not caplog.records
        with pytest.raises(TokenizerConfigError, match="too small"):  # the warning comes before the pieces
            extend_tokenizer(BASE_MODEL, texts, 1, tmp_path, corpus_name="my corpus")
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage().startswith("my corpus: ")
    assert "kana/Hangul as TC pieces" in record.getMessage()


# ---- caching ---------------------------------------------------------------------------------


def test_second_call_is_a_cache_hit(extended, corpora, min_added, cache_dir):
    started = time.perf_counter()
    again = extend_tokenizer(BASE_MODEL, corpora["tc_train"], min_added + EXTRA, cache_dir)
    assert time.perf_counter() - started < 1.0
    assert again.cached and not extended.cached
    assert (again.path, again.cache_key, again.vocab_size) == (extended.path, extended.cache_key, extended.vocab_size)
    assert not list((cache_dir / "tokenizers").glob(".tmp-*"))


def test_base_given_as_directory_shares_the_cache_entry(extended, corpora, min_added, cache_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(BASE_MODEL.read_bytes())
    again = extend_tokenizer(tmp_path, corpora["tc_train"], min_added + EXTRA, cache_dir)
    assert again.cached and again.path == extended.path


def test_parallel_jobs_get_one_complete_tokenizer(corpora, min_added, tmp_path):
    texts = corpora["tc_train"][:200]
    results = []

    def job():
        results.append(extend_tokenizer(BASE_MODEL, texts, min_added, tmp_path))

    jobs = [threading.Thread(target=job) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(results) == 2 and results[0].path == results[1].path
    assert sorted(r.cached for r in results) == [False, True]  # one built it while the other waited, then read it
    entries = [p.name for p in (tmp_path / "tokenizers").iterdir() if p.name != ".locks"]
    assert entries == [results[0].cache_key]  # no half-written or temporary directory left
    assert len(load_tokenizer(results[0].path)) == results[0].vocab_size


# ---- errors ----------------------------------------------------------------------------------


def test_added_vocab_below_the_required_characters_is_a_config_error(corpora, min_added, tmp_path):
    with pytest.raises(TokenizerConfigError, match=rf"tokenizer\.added_vocab={min_added - 1} is too small") as err:
        extend_tokenizer(BASE_MODEL, corpora["tc_train"], min_added - 1, tmp_path)
    assert f"at least {min_added}" in str(err.value)


def test_added_vocab_beyond_what_the_corpus_supplies_is_a_config_error(corpora, tmp_path):
    texts = corpora["tc_train"][:20]
    with pytest.raises(TokenizerConfigError, match=r"tokenizer\.added_vocab=1000000 is larger than") as err:
        extend_tokenizer(BASE_MODEL, texts, 1_000_000, tmp_path)
    supply = int(str(err.value).split("at most ")[1].split()[0])
    assert extend_tokenizer(BASE_MODEL, texts, supply, tmp_path).num_added == supply


@pytest.mark.parametrize(
    "base, added_vocab, message",
    [
        (BASE_MODEL, -1, r"tokenizer\.added_vocab=-1"),
        (BASE_MODEL, 1.5, r"tokenizer\.added_vocab=1\.5"),
        ("/no/such/dir/", 10, r"tokenizer\.base="),
        (ROOT / "data", 10, r"neither tokenizer\.model \(SentencePiece\) nor tokenizer\.json"),
        (ROOT / "data" / "tokenizers" / "LICENSE-mistral-v1.txt", 10, r"not a SentencePiece model"),
    ],
)
def test_bad_config_values_are_named(base, added_vocab, message, tmp_path):
    with pytest.raises(TokenizerConfigError, match=message):
        extend_tokenizer(base, ["春眠不覺曉"], added_vocab, tmp_path)


def test_unigram_base_is_refused(tmp_path):
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "good morning"] * 20),
        model_writer=model,
        model_type="unigram",
        vocab_size=30,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(TokenizerConfigError, match="UNIGRAM"):
        extend_tokenizer(tmp_path, ["春眠不覺曉"], 10, tmp_path / "cache")


def test_nfkc_base_counts_normalised_characters_and_stays_faithful(corpora, tmp_path):
    """A base with SentencePiece's nmt_nfkc normaliser: full-width punctuation is folded before counting."""
    import io

    en = corpora["en_val"][:200]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for doc in en for line in doc.splitlines() if line.strip()]),
        model_writer=model,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tc = corpora["tc_train"][:100]
    base = load_model_proto(model.getvalue())
    normalized = normalized_sentences(training_sentences(tc, 4192), base)
    need = len(new_characters(required_characters(normalized, 0.9995), base))
    result = extend_tokenizer(tmp_path, tc, need + 100, tmp_path / "cache")
    added = [p.piece for p in load_model_proto((result.path / "tokenizer.model").read_bytes()).pieces[800:]]
    assert "，" not in added and "。" in added  # NFKC folds the full-width comma to ",", keeps "。"
    sp = spm.SentencePieceProcessor(model_file=str(result.path / "tokenizer.model"))
    texts = corpora["tc_val"][:20] + en[:20] + ["ＡＢＣ　全形１２３，", " x"]
    assert [_ids(load_tokenizer(result.path), t) for t in texts] == sp.encode(texts)
