"""Document dedup (exact + MinHash near-duplicate) and OpenCC conversion, on real files through the
corpus loader the pipeline uses."""

from __future__ import annotations

import gzip
import json

import pytest
from omegaconf import OmegaConf

from bailong.data.config import CorpusConfig, DedupConfig
from bailong.data.corpus import CorpusError, load_documents
from bailong.data.dedup import Deduplicator, jaccard, make_deduplicator, normalise
from bailong.data.splits import load_splits
from conftest import compose_config

ARTICLE = (
    "臺北市是中華民國的首都，位於臺灣北部的臺北盆地。市內有故宮博物院、臺北101與陽明山國家公園，"
    "捷運系統連接各行政區，每日運量超過兩百萬人次。"
) * 3


def test_exact_duplicates_differ_only_in_case_width_and_spacing():
    d = Deduplicator(DedupConfig(exact=True, near=None))
    assert d.keep("Hello  World\n") and not d.keep("hello world") and not d.keep("ＨＥＬＬＯ　world")
    assert d.keep("hello world!")
    assert (d.stats.seen, d.stats.exact, d.stats.kept) == (4, 2, 2)
    assert normalise("Ａ\tB ") == "a b"


def test_near_duplicates_are_dropped_by_estimated_jaccard():
    edited = ARTICLE.replace("兩百萬", "二百萬", 1)  # one small edit: a mirror of the same page
    other = "長江是亞洲第一長河，發源於青藏高原，流經十一個省級行政區，於上海注入東海。" * 3
    assert jaccard(ARTICLE, edited) > 0.9 and jaccard(ARTICLE, other) < 0.1
    d = Deduplicator(DedupConfig(exact=True, near=0.8, num_perm=128))
    assert [d.keep(t) for t in (ARTICLE, edited, other)] == [True, False, True]
    assert d.stats.near == 1 and d.stats.exact == 0


def test_near_threshold_separates_pairs_far_from_it():
    base = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(600))  # 600 distinct-ish characters
    half = base[:300] + "".join(chr(0x4E00 + (i * 104729) % 20000) for i in range(300))
    assert 0.2 < jaccard(base, half) < 0.5
    d = Deduplicator(DedupConfig(exact=False, near=0.8))
    assert d.keep(base) and d.keep(half)  # a shared half is not a duplicate at 0.8


def test_make_deduplicator_only_when_a_check_is_on():
    assert make_deduplicator(None) is None and make_deduplicator(DedupConfig(exact=False, near=None)) is None
    exact_only = make_deduplicator(DedupConfig(exact=True, near=None))
    assert exact_only is not None and exact_only._lsh is None
    assert make_deduplicator(DedupConfig(exact=False, near=0.8))._lsh is not None
    with pytest.raises(TypeError, match="expected a bailong.data.config.DedupConfig, got dict"):
        make_deduplicator({"exact": False, "near": None})


def write_jsonl(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def test_s2twp_converts_simplified_wikipedia_style_text_to_taiwan_traditional(tmp_path):
    path = tmp_path / "zhwiki.jsonl.gz"
    write_jsonl(path, ["软件工程师用鼠标和内存条组装计算机。", "信息技术的网络服务器"])
    docs = load_documents([CorpusConfig(path=str(path), convert="s2twp")])
    # Taiwan phrasing, not only characters: 软件→軟體, 鼠标→滑鼠, 内存条→記憶體模組, 信息→資訊, 网络→網路
    assert docs == ["軟體工程師用滑鼠和記憶體模組組裝計算機。", "資訊科技的網路伺服器"]
    assert load_documents([CorpusConfig(path=str(path))])[0].startswith("软件")  # no convert: untouched


def test_unknown_conversion_names_the_corpus_and_the_choices(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    write_jsonl(path, ["文字"])
    with pytest.raises(CorpusError, match=r"a.jsonl.gz: convert='s2tw_typo' is not an OpenCC configuration"):
        load_documents([CorpusConfig(path=str(path), convert="s2tw_typo")])


def test_conversion_then_dedup_across_corpora_and_max_docs_counts_kept(tmp_path):
    simplified, traditional = tmp_path / "zh_cn.jsonl.gz", tmp_path / "zh_tw.jsonl.gz"
    write_jsonl(traditional, ["軟體工程師用滑鼠", "軟體工程師用滑鼠", "長江是亞洲第一長河"])
    write_jsonl(simplified, ["软件工程师用鼠标", "黄河是中国第二长河", "珠江流经广州"])
    d = Deduplicator(DedupConfig(exact=True, near=None))
    specs = [CorpusConfig(path=str(traditional)), CorpusConfig(path=str(simplified), convert="s2twp", max_docs=2)]
    docs = load_documents(specs, d)
    # the simplified copy of the first article converts into an exact duplicate and is skipped;
    # max_docs=2 then reads on to two kept documents
    assert docs == ["軟體工程師用滑鼠", "長江是亞洲第一長河", "黃河是中國第二長河", "珠江流經廣州"]
    assert d.stats.exact == 2


def test_all_duplicates_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_jsonl(a, ["同一篇文章"])
    write_jsonl(b, ["同一篇文章"])
    with pytest.raises(CorpusError, match="b.jsonl.gz: corpus is empty after deduplication"):
        load_documents([CorpusConfig(path=str(a)), CorpusConfig(path=str(b))], Deduplicator(DedupConfig(near=None)))


def test_data_dedup_key_composes_and_filters_the_splits(tmp_path):
    tc = tmp_path / "tc.jsonl.gz"
    write_jsonl(tc, [ARTICLE, ARTICLE.replace("兩百萬", "二百萬", 1), "長江是亞洲第一長河" * 5, "黃河" * 40])
    en = tmp_path / "en.jsonl.gz"
    write_jsonl(en, ["An English page.", "Another English page."])
    corpora = [f"data.tc=[{{path: '{tc}'}}]", f"data.en=[{{path: '{en}'}}]"]
    cfg = compose_config([*corpora, "data.dedup.exact=true", "data.dedup.near=0.8"], tmp_path)
    splits = load_splits(OmegaConf.to_object(cfg.data))
    assert len(splits.tc_train) + len(splits.tc_val) == 3
    no_dedup = load_splits(OmegaConf.to_object(compose_config(corpora, tmp_path).data))
    assert len(no_dedup.tc_train) + len(no_dedup.tc_val) == 4
