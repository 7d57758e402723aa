"""bailong.data.instruct: the Tang-poem instruction set — correct answers, both languages, multi-turn,
and no held-out poem (the pre-training split) in training."""

from __future__ import annotations

import json
import re

import pytest

from bailong.data.chat import load_conversations
from bailong.data.config import ChatCorpusConfig, CorpusConfig, DataConfig, InstructConfig
from bailong.data.instruct import build_instruct_set, read_poems, to_simplified
from bailong.data.prepare import prepare_text
from conftest import ROOT

POEMS = ROOT / "data" / "zh_tw" / "poetry_tang.jsonl.gz"
HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct")
    cfg = InstructConfig(poems=str(POEMS), max_train=3000, max_val=None, seed=0)
    stats = build_instruct_set(cfg, val_fraction=0.02, test_fraction=0.02, split_seed=0, out_dir=out)
    sets = {}
    for name in ("train", "val"):
        convs = load_conversations(ChatCorpusConfig(path=str(out / f"{name}.jsonl")))  # validated as any chat file
        tasks = [json.loads(line) for line in (out / f"{name}.tasks.jsonl").read_text().splitlines()]
        assert len(convs) == len(tasks)
        sets[name] = list(zip(convs, tasks))
    return out, stats, sets, read_poems(POEMS)


def test_no_held_out_poem_is_trained_on(built, tmp_path):
    """The set's split is the prepare stage's: it trains on the poems pre-training trains on, validates on the dev
    poems and leaves the test poems out of both."""
    _, stats, sets, poems = built
    data = DataConfig(tc=[CorpusConfig(path=str(POEMS), format="jsonl")], val_fraction=0.02, test_fraction=0.02)
    prepared = prepare_text(data, tmp_path)
    dev, test = (set(prepared.documents("tc", split)) for split in ("dev", "test"))
    held = {p.index for p in poems if p.text in dev}
    left_out = {p.index for p in poems if p.text in test}
    assert stats["val_poems"] == len(held) > 100 and stats["test_poems_left_out"] == len(left_out) > 100
    train_poems = {t["poem"] for _, t in sets["train"]}
    val_poems = {t["poem"] for _, t in sets["val"]}
    assert not train_poems & (held | left_out) and not val_poems & left_out
    assert val_poems <= held and len(val_poems) > 0.8 * len(held)
    for _, task in sets["train"]:  # and no training prompt quotes a held-out poem's line
        assert poems[task["poem"]].text not in dev | test


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


def test_generation_is_deterministic(built, tmp_path):
    out, _, _, _ = built
    cfg = InstructConfig(poems=str(POEMS), max_train=3000, max_val=None, seed=0)
    build_instruct_set(cfg, val_fraction=0.02, test_fraction=0.02, split_seed=0, out_dir=tmp_path)
    for name in ("train.jsonl", "val.jsonl", "train.tasks.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_cli_writes_the_set(tmp_path):
    from bailong.data.instruct import main

    main(["--poems", str(POEMS), "--out", str(tmp_path), "--max-train", "50", "--max-val", "5"])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["train"]["conversations"] == 50 and stats["val"]["conversations"] == 5
