"""bailong.data.instruct: the Tang-poem instruction set — correct answers, both languages, multi-turn,
and no held-out poem (the prepare stage's split, read back) in training."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import replace

import pytest

from bailong.cache import default_cache_dir
from bailong.data.chat import load_conversations
from bailong.data.config import (
    ChatCorpusConfig,
    CorpusConfig,
    DataConfig,
    DedupConfig,
    InstructConfig,
    data_config_from_yaml,
)
from bailong.data.instruct import build_instruct_set, cached_instruct_set, read_poems, to_simplified
from bailong.data.prepare import prepare_text
from bailong.errors import ConfigError
from conftest import ROOT

POEMS = ROOT / "data" / "zh_tw" / "poetry_tang.jsonl.gz"
HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def default_data():
    """The default data config (conf/data/pretrain_tc.yaml) and its prepared text, in the project's cache (shared
    with every run and test that prepares the default data)."""
    data = data_config_from_yaml(ROOT / "conf" / "data" / "pretrain_tc.yaml", ROOT / "data")
    return data, prepare_text(data, default_cache_dir())


@pytest.fixture(scope="module")
def built(tmp_path_factory, default_data):
    data, prepared = default_data
    out = tmp_path_factory.mktemp("instruct")
    cfg = InstructConfig(poems=str(POEMS), max_train=3000, max_val=None, seed=0)
    stats = build_instruct_set(cfg, data=data, prepared=prepared, out_dir=out)
    sets = {}
    for name in ("train", "val"):
        convs = load_conversations(ChatCorpusConfig(path=str(out / f"{name}.jsonl")))  # validated as any chat file
        tasks = [json.loads(line) for line in (out / f"{name}.tasks.jsonl").read_text().splitlines()]
        assert len(convs) == len(tasks)
        sets[name] = list(zip(convs, tasks))
    return out, stats, sets, read_poems(POEMS)


def test_no_held_out_poem_is_trained_on(built, default_data):
    """The set's split is the prepare stage's, read back: it trains on the poems pre-training trains on, validates on
    the dev poems and leaves the test poems out of both; a poem's variants (same title and author: the default
    config's group_by) are all on one side, which a split by each poem's own text would not give."""
    _, stats, sets, poems = built
    _, prepared = default_data
    train, dev, test = (set(prepared.documents_by_source("tc", split)[0]) for split in ("train", "dev", "test"))
    held = {p.index for p in poems if p.text in dev}
    left_out = {p.index for p in poems if p.text in test}
    assert stats["train_poems"] == sum(p.text in train for p in poems) > 13000  # the records: repeats counted
    assert stats["val_poems"] == len(held) > 100 and stats["test_poems_left_out"] == len(left_out) > 100
    train_poems = {t["poem"] for _, t in sets["train"]}
    val_poems = {t["poem"] for _, t in sets["val"]}
    assert not train_poems & (held | left_out) and not val_poems & left_out
    assert val_poems <= held and len(val_poems) > 0.8 * len(held)
    for _, task in sets["train"]:  # and no training prompt quotes a held-out poem's line
        assert poems[task["poem"]].text in train and poems[task["poem"]].text not in dev | test

    def groups(indices):
        return {(poems[i].title, poems[i].author) for i in indices}

    assert not groups(train_poems) & groups(held | left_out)


def test_answers_are_right(built):
    _, _, sets, poems = built
    checked = 0
    for conv, task in sets["train"][:600]:
        poem = poems[task["poem"]]
        turns = [m for m in conv if m["role"] != "system"]
        prompt, answer = turns[0]["content"], turns[1]["content"]
        quoted = re.search(r"[「\"](.+?)[」\"]", prompt)
        if task["task"] == "next":
            line = quoted.group(1)
            nxt = answer if task["lang"] == "tc" else re.search(r'"(.+)"', answer).group(1)
            assert (
                f"{line}，{nxt}" in poem.text
                or f"{line}。\n{nxt}" in poem.text
                or line + nxt in re.sub(r"\W", "", poem.text)
            )
        elif task["task"] == "author":
            assert poem.author in answer and quoted.group(1) in poem.text
        elif task["task"] == "title":
            assert poem.title in answer and poem.author in answer
        elif task["task"] == "to_sc":
            line = prompt.rsplit("：", 1)[-1].rsplit(": ", 1)[-1]
            assert line in poem.text and answer == to_simplified(line)
        elif task["task"] == "to_tc":
            assert answer in poem.text and to_simplified(answer) in prompt and to_simplified(answer) != answer
        checked += 1
        for _, follow_a in zip(turns[2::2], turns[3::2]):  # follow-ups are about the same poem
            assert poem.author in follow_a["content"] or poem.title in follow_a["content"]
    assert checked == 600


def test_both_languages_all_tasks_multi_turn_and_system(built):
    _, stats, sets, _ = built
    kinds = {f"{t['lang']}/{t['task']}" for _, t in sets["train"]}
    assert kinds == {f"{lang}/{k}" for lang in ("tc", "en") for k in ("next", "author", "title", "to_sc", "to_tc")}
    assert stats["train"]["conversations"] == 3000 and stats["train"]["multi_turn"] > 300
    assert any(conv[0]["role"] == "system" for conv, _ in sets["train"])
    for conv, task in sets["train"]:
        first_prompt = next(m["content"] for m in conv if m["role"] == "user")
        if task["lang"] == "en":
            assert re.match(r"[A-Z][a-z]+ ", first_prompt)
            if task["task"] in ("author", "title", "next"):  # answered in English around the quoted names
                answer = conv[-1]["content"]
                assert len(re.findall(r"[A-Za-z]+", answer)) >= 3
        else:
            assert HAN.match(first_prompt) or first_prompt.startswith("「")


def test_generation_is_deterministic(built, default_data, tmp_path):
    out, _, _, _ = built
    data, prepared = default_data
    cfg = InstructConfig(poems=str(POEMS), max_train=3000, max_val=None, seed=0)
    build_instruct_set(cfg, data=data, prepared=prepared, out_dir=tmp_path)
    for name in ("train.jsonl", "val.jsonl", "train.tasks.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_cli_writes_the_set(tmp_path):
    from bailong.data.instruct import main

    main(["--poems", str(POEMS), "--out", str(tmp_path), "--max-train", "50", "--max-val", "5"])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["train"]["conversations"] == 50 and stats["val"]["conversations"] == 5


def poem_file(path, poems: list[tuple[str, str, str]]):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for text, title, author in poems:
            fh.write(json.dumps({"text": text, "title": title, "author": author}, ensure_ascii=False) + "\n")
    return path


def test_the_split_is_read_back_converted_as_the_corpus_converts_it(tmp_path):
    """A poem file in Simplified script whose corpus converts it (OpenCC s2t): the prepared split holds the converted
    texts, and each poem's converted text is what is looked up, so every poem is in the set's train or dev side
    exactly as the prepared split has it (comparing the raw text would find none)."""
    poems = read_poems(POEMS)[:120]
    simplified = [(to_simplified(p.text), p.title, p.author) for p in poems]
    path = poem_file(tmp_path / "sc.jsonl.gz", simplified)
    corpus = CorpusConfig(path=str(path), format="jsonl", convert="s2t", group_by=["title", "author"])
    data = DataConfig(tc=[corpus], val_fraction=0.1, test_fraction=0.1, dedup=DedupConfig(exact=False, near=None))
    prepared = prepare_text(data, tmp_path / "cache")
    counts = prepared.manifest["languages"]["tc"]["sources"][0]["docs"]
    kept = {text for split in ("train", "dev", "test") for text in prepared.documents("tc", split)}
    assert counts["dev"] and counts["test"] and sum(text in kept for text, _, _ in simplified) < 12  # converted
    cfg = InstructConfig(poems=str(path), max_train=None, max_val=None)
    stats = build_instruct_set(cfg, data=data, prepared=prepared, out_dir=tmp_path / "set")
    assert (stats["train_poems"], stats["val_poems"], stats["test_poems_left_out"]) == (
        counts["train"],
        counts["dev"],
        counts["test"],
    )
    assert stats["other_poems_left_out"] == 0


def test_poems_outside_the_data_config_are_a_config_error(tmp_path, default_data):
    """The instruction set follows the prepared split, so its poem file must be one of the data config's corpora."""
    data, prepared = default_data
    other = poem_file(tmp_path / "other.jsonl.gz", [("床前明月光，疑是地上霜。", "靜夜思", "李白")])
    with pytest.raises(
        ConfigError, match=rf"data\.chat\.instruct\.poems: path={re.escape(str(other))} is not a corpus"
    ):
        build_instruct_set(InstructConfig(poems=str(other)), data=data, prepared=prepared, out_dir=tmp_path / "a")
    # a poem file the prepare stage read only in part (max_docs): the unread poems are in neither side
    capped = replace(data, **{lang: [replace(s, max_docs=200) for s in getattr(data, lang)] for lang in ("tc", "en")})
    folder = cached_instruct_set(InstructConfig(poems=str(POEMS)), data=capped, cache_dir=tmp_path / "cache")
    stats = json.loads((folder / "stats.json").read_text())
    prepared = prepare_text(capped, tmp_path / "cache")  # what cached_instruct_set prepared
    read = {text for split in ("train", "dev", "test") for text in prepared.documents_by_source("tc", split)[0]}
    in_split = sum(p.text in read for p in read_poems(POEMS))  # the 200 read, and later repeats of their texts
    assert 200 <= stats["train_poems"] + stats["val_poems"] + stats["test_poems_left_out"] == in_split < 250
    assert stats["other_poems_left_out"] == stats["poems"] - in_split
