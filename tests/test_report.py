"""The split report (python -m bailong.data.report) and the splits it checks: counts recomputed from the texts, the
near-duplicate pairs and shared spans found on planted examples, and grouping (near-duplicates, group_by fields)
leaving none across the split."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bailong.data.config import CorpusConfig, DataConfig, DedupConfig
from bailong.data.corpus import CorpusError, write_jsonl
from bailong.data.prepare import prepare_text
from bailong.data.report import HeldOut, count_near_duplicate_pairs, mark_shared_spans, split_report
from bailong.data.report.__main__ import main
from test_prepare import DATA, corpus_files, split_with_grouping  # noqa: F401 (corpus_files: a fixture)


def held_out(*texts: str) -> HeldOut:
    return HeldOut(list(texts), [(0, "dev")] * len(texts), [0] * len(texts), [bytearray(len(t)) for t in texts])


def test_shared_spans_cover_exactly_the_characters_inside_a_shared_window():
    shared = "春眠不覺曉處處聞啼鳥夜來風雨聲花落知多少床前明月光疑是地上霜"  # 31 characters
    held = held_out(shared[:30] + "一二三四五六七八九十" * 3, "完全不同的一段文字" * 5)
    mark_shared_spans(["開頭" + shared + "結尾", "另一篇"], held, span=24)
    assert list(held.covered[0]) == [1] * 30 + [0] * 30  # the 30 shared characters, none after
    assert sum(held.covered[1]) == 0
    held = held_out(shared[:23] + "一二三")
    mark_shared_spans([shared], held, span=24)  # 23 shared characters: shorter than a span, not counted
    assert sum(held.covered[0]) == 0


def test_near_duplicate_pairs_are_counted_by_exact_jaccard():
    poem = "國破山河在，城春草木深。感時花濺淚，恨別鳥驚心。烽火連三月，家書抵萬金。白頭搔更短，渾欲不勝簪。"
    variant = poem.replace("抵萬金", "值萬金")  # one word changed: Jaccard ~0.85
    far = poem[:24] + "江流天地外山色有無中郡邑浮前浦波瀾動遠空襄陽好風日留醉與山翁" * 2  # Jaccard ~0.2
    held = held_out(poem)
    count_near_duplicate_pairs([variant, far, "無關的文字" * 20, variant], held, jaccard=0.5, ngram=5)
    assert held.pairs == [2]  # the variant, twice; the far text shares too little


def grouped(files, **dedup) -> DataConfig:
    data = DataConfig(
        tc=[CorpusConfig(path=str(files["tc"]))],
        en=[CorpusConfig(path=str(files["en"]))],
        val_fraction=0.1,
        test_fraction=0.1,
        dedup=DedupConfig(exact=True, near=0.8, **dedup),
    )
    return data


def test_the_report_counts_leaks_and_grouping_removes_them(corpus_files, tmp_path):  # noqa: F811
    # near copies below the removal threshold: the long documents again, with one edit per 30 characters
    variants = tmp_path / "variants.jsonl"
    long_docs = [json.loads(x)["text"] for x in corpus_files["tc"].read_text().splitlines()]
    long_docs = [d for d in long_docs if len(d) > 400][:12]
    edited = ["".join("。" if i % 30 == 7 else c for i, c in enumerate(d)) for d in long_docs]
    write_jsonl([{"text": t} for t in long_docs + edited], variants)
    files = {**corpus_files, "tc": variants}
    before = split_report(grouped(files), tmp_path / "a", jaccard=0.5)
    after = split_report(grouped(files, group=0.3), tmp_path / "b", jaccard=0.5)
    assert before["tc"]["dev"]["near_duplicate_pairs"] + before["tc"]["test"]["near_duplicate_pairs"] > 0
    for lang in ("tc", "en"):
        for split in ("dev", "test"):
            assert after[lang][split]["near_duplicate_pairs"] == 0
            for src in after[lang]["sources"]:
                assert src[split]["near_duplicate_pairs"] == 0
    # the counts are the files' own: recomputed from the prepared text
    prepared = prepare_text(grouped(files, group=0.3), tmp_path / "b")
    for split in ("train", "dev", "test"):
        docs = list(prepared.documents("tc", split))
        assert after["tc"][split]["documents"] == len(docs)
        assert after["tc"][split]["characters"] == sum(map(len, docs))
    assert after["tc"]["sources"][0]["grouped"] > 0


def test_group_by_fields_put_a_poems_variants_in_one_split(tmp_path):
    poems = [{"text": f"第{i}首，山高水長，明月千里。", "title": f"題{i // 4}", "author": "李白"} for i in range(200)]
    path = write_jsonl(poems, tmp_path / "poems.jsonl")
    data = DataConfig(
        tc=[CorpusConfig(path=str(path), group_by=["title", "author"])],
        en=[CorpusConfig(path=str(DATA / "en/fortunes.jsonl.gz"), max_docs=50)],
        val_fraction=0.2,
        test_fraction=0.2,
    )
    prepared = prepare_text(data, tmp_path / "cache")
    split_of = {doc: split for split in ("train", "dev", "test") for doc in prepared.documents("tc", split)}
    assert len(split_of) == 200
    for title in range(50):  # each title's four poems in one split, and the splits are all used
        assert len({split_of[f"第{i}首，山高水長，明月千里。"] for i in range(4 * title, 4 * title + 4)}) == 1
    assert set(split_of.values()) == {"train", "dev", "test"}
    # an untitled poem groups by its author; a record with none of the fields is a misspelt field or the wrong file
    bad = write_jsonl(
        [{"text": "一首詩", "author": "王維"}, {"text": "二首詩", "titel": "無題"}], tmp_path / "bad.jsonl"
    )
    data = replace(data, tc=[CorpusConfig(path=str(bad), group_by=["title", "author"])])
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: none of the group_by fields \['title', 'author'\]"):
        prepare_text(data, tmp_path / "cache")


def test_the_command_prints_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = main(
        [
            "data.tc.0.max_docs=300",
            "data.tc.1.max_docs=5",
            "data.tc.2.max_docs=5",
            "data.en.0.max_docs=50",
            "data.en.1.max_docs=200",
            f"paths.cache_dir={tmp_path}",
        ]
    )
    assert json.loads(capsys.readouterr().out) == report
    assert set(report["tc"]["dev"]) >= {"documents", "characters", "near_duplicate_pairs", "span24_share"}
    assert [s["path"].rsplit("/", 1)[-1] for s in report["tc"]["sources"]] == [
        "poetry_tang.jsonl.gz",
        "modern.jsonl.gz",
        "classics.jsonl.gz",
    ]


def test_a_document_near_two_splits_is_dropped(tmp_path):
    """B is half of A and half of C (Jaccard ~0.33 with each), A and C unrelated and held in different splits: B can
    join neither without a near-duplicate across the split, so grouping drops it (counted as bridged)."""
    from bailong.data.corpus import load_documents
    from bailong.data.dedup import jaccard
    from bailong.data.prepare import split_of

    docs = [d[:600] for d in load_documents([CorpusConfig(path=str(DATA / "zh_tw/modern.jsonl.gz"))]) if len(d) > 600]
    a = docs[0]
    c = next(d for d in docs[1:] if split_of(d, 0, 0.3, 0.3) != split_of(a, 0, 0.3, 0.3) and jaccard(a, d) < 0.1)
    b = a[:300] + c[300:]
    assert min(jaccard(b, a), jaccard(b, c)) > 0.25
    path = write_jsonl([{"text": t} for t in (a, c, b)], tmp_path / "bridge.jsonl")

    kept, src = split_with_grouping(path, 0.2, tmp_path / "grouped")
    assert set(kept) == {a, c} and src["bridged"] == 1 and src["read"] - src["kept"] == 1
    kept, src = split_with_grouping(path, None, tmp_path / "plain")  # no grouping: B stays, by its own hash
    assert set(kept) == {a, b, c} and src["bridged"] == 0
