"""Language identification and Traditional purity: exact on hand-made cases, and on the data pack's
held-out Traditional Chinese and its OpenCC Simplified conversion."""

from __future__ import annotations

import opencc
import pytest

from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents, split_documents
from bailong.eval.consistency import identify_language, language_consistent, script_counts, traditional_purity
from conftest import ROOT


@pytest.mark.parametrize(
    "text,lang",
    [
        ("我們的國家很大", "tc"),
        ("我们的国家很大", "sc"),
        ("床前明月光，疑是地上霜。", "tc"),  # Taiwan's 床 is Traditional (plain s2t would want 牀)
        ("山人月", "tc"),  # only characters shared by both scripts: valid Traditional
        ("The quick brown fox jumps over the lazy dog.", "en"),
        ("我用 Python 寫程式", "tc"),  # an English word inside Chinese does not make it English
        ("Use 中文 in the middle of an English sentence", "en"),
        ("", "unknown"),
        ("123 !!! ...", "unknown"),
    ],
)
def test_identify_language(text, lang):
    assert identify_language(text) == lang


def test_script_counts_follow_opencc_in_context():
    # 后 in 皇后 is the Traditional word (queen); 以後 is Traditional for "later": OpenCC's phrases see both
    counts = script_counts("皇后在以後的日子")
    assert (counts.han, counts.traditional, counts.simplified) == (8, 1, 0)
    assert script_counts("皇后在以后的日子").simplified == 1


def test_purity_is_the_traditional_share_of_distinguishing_characters():
    assert traditional_purity("我們的國家") == 1.0
    assert traditional_purity("我们的国家") == 0.0
    assert traditional_purity("我們的国家") == 0.5  # 們 Traditional, 国 Simplified; 我 的 家 shared
    assert traditional_purity("山人月") is None  # no evidence either way
    assert traditional_purity("English only") is None


def test_language_consistent_with_translation_and_bad_input():
    assert language_consistent("tc", "今天天氣很好。")
    assert not language_consistent("tc", "今天天气很好。")  # Simplified is not Traditional
    assert not language_consistent("tc", "The weather is nice today.")
    assert language_consistent("tc", "The weather is nice today.", expected_lang="en")  # asked to translate
    assert not language_consistent("en", "")
    with pytest.raises(ValueError, match="expected one of tc, sc, en"):
        language_consistent("zh", "你好")


def test_on_held_out_text_and_its_simplified_conversion():
    t2s = opencc.OpenCC("t2s")
    docs = []
    for name in ("zh_tw/poetry_tang", "zh_tw/modern"):
        _, val = split_documents(load_documents([CorpusConfig(path=str(ROOT / "data" / f"{name}.jsonl.gz"))]), 0.02, 0)
        docs += val[:100]
    tc = [identify_language(d) for d in docs]
    sc = [identify_language(t2s.convert(d)) for d in docs]
    assert tc.count("tc") >= 0.97 * len(docs), tc
    assert sc.count("sc") >= 0.97 * len(docs), sc
    purities = [p for p in map(traditional_purity, docs) if p is not None]
    assert sum(purities) / len(purities) > 0.97
