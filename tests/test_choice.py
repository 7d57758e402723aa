"""Multiple choice: the per-choice score equals a brute-force bits/char, the MC file format fails with
file:line, and the generated sets come only from test documents with length-matched distractors."""

from __future__ import annotations

import gzip
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.config import CorpusConfig
from bailong.data.corpus import CorpusError
from bailong.data.prepare import prepare_text
from bailong.errors import ConfigError
from bailong.eval.choice import (
    MCItem,
    choice_windows,
    continuation_ids,
    load_mc_file,
    score_choices,
    write_mc_file,
)
from bailong.eval.config import MCConfig
from bailong.eval.mc_sets import _lines, build_mc_sets, next_line_items
from conftest import ROOT, compose_config

MINI = ROOT / "models" / "mini-base"
POEMS = ROOT / "data" / "zh_tw" / "poetry_tang.jsonl.gz"


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MINI).eval(), AutoTokenizer.from_pretrained(MINI)


def brute_force_bpc(model, tokenizer, question: str, choice: str) -> float:
    """-log2 p(choice | BOS question) / characters, from one plain forward over the joined text."""
    ctx, cont = continuation_ids(tokenizer, question, choice)
    ids = torch.tensor([[tokenizer.bos_token_id, *ctx, *cont]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    first = 1 + len(ctx)
    bits = -sum(logp[t - 1, ids[0, t]].item() for t in range(first, ids.shape[1])) / math.log(2)
    return bits / len(choice)


def test_continuation_tokens_are_cut_from_the_joined_text(mini):
    _, tok = mini
    for question, choice in [("床前明月光，\n", "疑是地上霜。"), ("In the beginning God created the", " heaven")]:
        ctx, cont = continuation_ids(tok, question, choice)
        assert ctx + cont == tok(question + choice, add_special_tokens=False)["input_ids"]
        assert cont and tok.decode(cont).strip() == choice.strip()


def test_choice_scores_equal_brute_force_and_pick_the_fewest_bits_per_char(mini):
    model, tok = mini
    items = [
        MCItem(
            "In the beginning God created the heaven and the",
            (" earth.", " qxzv bnnk.", " purple seventeen."),
            0,
            "en",
            "a",
        ),
        MCItem("床前明月光，\n", ("疑是地上霜。", "馬鞍鎖鑰舞。", "腦電測試碼。"), 0, "tc", "b"),
    ]
    result = score_choices(model, tok, items, batch_size=2)
    for item, pred in zip(items, result.predictions):
        expected = [brute_force_bpc(model, tok, item.question, c) for c in item.choices]
        assert pred["bpc"] == pytest.approx([round(b, 4) for b in expected], abs=2e-4)
        assert pred["predicted"] == min(range(len(expected)), key=expected.__getitem__)
    assert result.predictions[0]["predicted"] == 0  # the mini base knows Genesis 1:1
    assert result.chance == pytest.approx(1 / 3)
    metrics = result.metrics("mc/x")
    assert metrics["mc/x_acc"] == result.accuracy and metrics["mc/x_n"] == 2.0


def test_long_questions_are_cut_from_the_left(mini):
    _, tok = mini
    item = MCItem("word " * 500, ("end.", "stop."), 1)
    for window in choice_windows(tok, item, max_len=32):
        assert len(window.input_ids) == 32 and window.input_ids[0] == tok.bos_token_id
        assert window.first_scored < 32


def test_mc_file_round_trip_and_errors(tmp_path):
    items = [MCItem("q\n", ("a", "b"), 1, "en", "1"), MCItem("問\n", ("甲", "乙", "丙"), 0)]
    path = write_mc_file(items, tmp_path / "set.jsonl")
    assert load_mc_file(path) == items
    gz = tmp_path / "set.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_mc_file(gz) == items

    cases = {
        (
            '{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a"], "answer": 0}'
        ): r"bad.jsonl:2: 'choices' must be a list of at least 2",
        '{"question": "q", "choices": ["a", "b"], "answer": 2}': (
            r"bad.jsonl:1: 'answer' must be a 0-based index below 2"
        ),
        '{"question": "q", "choices": ["a", "a"], "answer": 0}': r"bad.jsonl:1: 'choices' repeat",
        '{"choices": ["a", "b"], "answer": 0}': r"bad.jsonl:1: 'question' must be a string",
        '{"question": "q", "choices": ["a", "b"], "answer": true}': r"'answer' must be a 0-based index",
        '\n{"question": "q",': r"bad.jsonl:2: not valid JSON",
        '["q", ["a", "b"], 0]': r"bad.jsonl:1: expected a JSON object",
        "": r"bad.jsonl: no MC items",
    }
    for text, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(CorpusError, match=message):
            load_mc_file(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="MC file not found"):
        load_mc_file(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def default_data():
    """The default data config and its prepared text (the project's cache: shared with runs and other tests)."""
    cfg = compose_config([])
    data = OmegaConf.to_object(cfg.data)
    return cfg, data, prepare_text(data, cfg.paths.cache_dir)


def test_poem_items_come_from_test_poems_with_same_length_distractors(default_data):
    _, _, prepared = default_data
    train, test = (list(prepared.documents_by_source("tc", split)[0]) for split in ("train", "test"))
    items = next_line_items(test, n_items=60, num_choices=4, context_lines=2, lang="tc", seed=3)
    assert len(items) == 60
    assert items == next_line_items(test, n_items=60, num_choices=4, context_lines=2, lang="tc", seed=3)
    train_lines = {line for doc in train for line in _lines(doc)}
    test_lines = [_lines(doc) for doc in test]
    docs_used = set()
    for item in items:
        d, i = map(int, item.id.split(":"))
        docs_used.add(d)
        answer = item.choices[item.answer]
        assert test_lines[d][i] == answer
        assert item.question == "\n".join(test_lines[d][max(0, i - 2) : i]) + "\n"
        assert len(set(item.choices)) == 4 and {len(c) for c in item.choices} == {len(answer)}
        for k, choice in enumerate(item.choices):
            if k != item.answer:  # a distractor: a line of another held-out poem
                assert choice not in test_lines[d]
                assert any(choice in lines for lines in test_lines)
    assert len(docs_used) == 60  # one item per poem before any poem gives a second
    assert not any(it.choices[it.answer] in train_lines for it in items)
    assert {it.answer for it in items} == {0, 1, 2, 3}


def test_generated_sets_are_the_test_split_and_no_answer_was_trained_on(default_data):
    """build_mc_sets reads each source's prepared test split (the grouped split of the default data): every item's
    question and answer are lines of a test document of its corpus, and no TC answer is a line of a training poem
    (the two-way split of each file's own text, before, gave 10 of 1,000)."""
    cfg, data, prepared = default_data
    mc = OmegaConf.to_object(compose_config(["mc.items_per_lang=1000"]).mc)
    sets = build_mc_sets(mc, data=data, cache_dir=cfg.paths.cache_dir)
    for lang, sources in (("tc", mc.tc_sources), ("en", mc.en_sources)):
        for k, spec in enumerate(sources):
            i = [str(c.path) for c in getattr(data, lang)].index(str(spec.path))
            docs = [_lines(doc) for doc in prepared.documents_by_source(lang, "test")[i]]
            mine = [it for it in sets[lang] if it.id.startswith(f"{lang}{k}:")]
            assert mine
            for item in mine:
                d, line = map(int, item.id.split(":")[1:])
                assert docs[d][line] == item.choices[item.answer]
    assert len(sets["tc"]) > 800  # the test poems run out before 1,000
    train_lines = {line for doc in prepared.documents_by_source("tc", "train")[0] for line in _lines(doc)}
    assert sum(it.choices[it.answer] in train_lines for it in sets["tc"]) == 0


def test_a_source_outside_the_data_config_is_a_config_error(default_data, tmp_path):
    """An MC source is a corpus of the data config, by path: another file was never split, so it fails, naming the
    key and the path, before anything is prepared."""
    _, data, _ = default_data
    other = tmp_path / "poems.jsonl"
    other.write_text('{"text": "床前明月光，\\n疑是地上霜。"}\n', encoding="utf-8")
    mc = MCConfig(tc_sources=[CorpusConfig(path=str(POEMS))], en_sources=[data.en[0], CorpusConfig(path=str(other))])
    with pytest.raises(
        ConfigError, match=rf"mc\.en_sources\.1: path={re.escape(str(other))} is not a corpus of data\.en"
    ):
        build_mc_sets(mc, data=data, cache_dir=tmp_path / "cache")
    mc = MCConfig(tc_sources=[data.en[0]], en_sources=list(data.en))  # an English corpus is no TC source
    with pytest.raises(ConfigError, match=r"mc\.tc_sources\.0: path=.*kjv.jsonl.gz is not a corpus of data\.tc"):
        build_mc_sets(mc, data=data, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_english_distractors_are_length_matched_within_tolerance():
    docs = [
        "one two three\nfour five six seven\nmore words here",
        "alpha beta gamma\ndelta epsilon zeta eta",
        "red green blue\ncyan magenta yellow key",
        "sun moon stars\nrain snow wind hail now",
    ]
    items = next_line_items(docs, n_items=8, num_choices=2, context_lines=1, length_tolerance=0.2, seed=0)
    assert items
    for item in items:
        answer = item.choices[item.answer]
        assert all(abs(len(c) - len(answer)) <= 0.2 * len(answer) for c in item.choices)
    with pytest.raises(ValueError, match="num_choices must be at least 2"):
        next_line_items(docs, n_items=1, num_choices=1)
