"""Corpus loading: every format, the hub code path on local files, clear errors, the split."""

from __future__ import annotations

import gzip
import json

import pytest
from omegaconf import OmegaConf

from bailong.data.config import CorpusConfig, DataConfig
from bailong.data.corpus import CorpusError, load_documents, split_documents, split_keys, split_of
from bailong.data.prepare import prepare_text
from bailong.data.splits import cap_chars, load_splits


def write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_and_gz(tmp_path, gz):
    p = write_jsonl(
        tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"),
        [{"text": "床前明月光"}, {"text": "  "}, {"text": "Hello"}],
        gz=gz,
    )
    assert load_documents([CorpusConfig(path=str(p))]) == ["床前明月光", "Hello"]


def test_txt_blocks_and_gz(tmp_path):
    body = "第一段\n第二行\n\n\nsecond doc\n"
    (tmp_path / "a.txt").write_text(body, encoding="utf-8")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(body.encode("utf-8")))
    for name in ("a.txt", "a.txt.gz"):
        assert load_documents([CorpusConfig(path=str(tmp_path / name))]) == ["第一段\n第二行", "second doc"]


def test_custom_text_field_and_max_docs(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"content": f"doc {i}"} for i in range(5)])
    assert load_documents([CorpusConfig(path=str(p), text_field="content", max_docs=2)]) == ["doc 0", "doc 1"]


def test_hub_code_path_on_local_files(tmp_path):
    # the same datasets.load_dataset call a hub name takes, with the "json" builder on a local file
    p = write_jsonl(tmp_path / "c.jsonl", [{"text": "甲"}, {"text": "乙"}])
    spec = dict(path="json", format="hub", data_files=str(p), split="train")
    assert load_documents([CorpusConfig(**spec)]) == ["甲", "乙"]
    assert load_documents([CorpusConfig(**spec, streaming=True)]) == ["甲", "乙"]


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_documents([CorpusConfig(path=str(tmp_path / "nope.jsonl"))])


def test_empty_corpus(tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(CorpusError, match="empty"):
        load_documents([CorpusConfig(path=str(p))])


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        load_documents([CorpusConfig(path=str(p))])


def test_missing_text_field_names_line_and_keys(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(CorpusError, match=r"f\.jsonl:2: expected a string field 'text' \(found: body\)"):
        load_documents([CorpusConfig(path=str(p))])


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"fine\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt:2: bytes are not valid UTF-8"):
        load_documents([CorpusConfig(path=str(p))])


def test_unknown_extension(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("a,b\n")
    with pytest.raises(CorpusError, match="cannot tell the corpus format"):
        load_documents([CorpusConfig(path=str(p))])


def test_split_is_deterministic_by_document():
    docs = [f"document {i}" for i in range(2000)]
    train, val = split_documents(docs, 0.05, seed=0)
    assert len(train) + len(val) == len(docs) and not set(train) & set(val)
    assert 60 <= len(val) <= 140  # ~5%
    # order-independent: shuffling the corpus does not move a document across the split
    train2, val2 = split_documents(list(reversed(docs)), 0.05, seed=0)
    assert set(val2) == set(val)
    assert set(split_documents(docs, 0.05, seed=1)[1]) != set(val)


def test_split_holds_out_at_least_one():
    train, val = split_documents(["a", "b"], 0.01)
    assert len(val) == 1 and len(train) == 1


def test_split_keys_is_the_prepare_stages_three_way_split(tmp_path):
    """Chat files are split by split_keys: split_of per key (train, dev and test, order-independent) and, as the
    prepare stage does for a tiny corpus, one dev key when none fell there; on documents it agrees with
    prepare_text."""
    keys = [f"conversation {i}" for i in range(2000)]
    split = split_keys(keys, 0, 0.05, 0.05)
    assert split == [split_of(k, 0, 0.05, 0.05) for k in keys]
    assert 60 <= split.count("dev") <= 140 and 60 <= split.count("test") <= 140
    assert split_keys(list(reversed(keys)), 0, 0.05, 0.05) == list(reversed(split))
    tiny = split_keys(["a", "b", "c"], 0, 0.01, 0.01)
    assert tiny.count("dev") == 1 and tiny.count("train") == 2
    docs = [f"文件{i}：" + "天地玄黃" * (i % 5 + 1) for i in range(300)] + ["a", "b"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    prepared = prepare_text(
        DataConfig(tc=[CorpusConfig(path=str(path))], val_fraction=0.1, test_fraction=0.1), tmp_path
    )
    split = split_keys(docs, 0, 0.1, 0.1)
    for name in ("train", "dev", "test"):
        assert list(prepared.documents("tc", name)) == [d for d, s in zip(docs, split) if s == name]


def test_cap_chars():
    assert cap_chars(["aaaa", "bb", "c"], 5) == ["aaaa"]
    assert cap_chars(["aaaaaa"], 3) == ["aaaaaa"]  # never empty
    assert cap_chars(["a"], None) == ["a"]


def test_repo_corpora_split(make_config, tmp_path):
    cfg = make_config(["data.max_val_chars=3000"], output_dir=tmp_path)
    s = load_splits(OmegaConf.to_object(cfg.data), tmp_path)
    assert s.tc_train and list(s.train_documents("en")) and s.tc_val and s.en_val and s.tc_test and s.en_test
    assert not set(s.tc_val) & set(s.tc_train)
    assert sum(map(len, s.tc_val)) <= 3000 + max(map(len, s.tc_val)) * len(cfg.data.tc)
