"""The bench runner: the shipped prompts file, prompt-file errors (multi-turn ones included), rule scores by
hand, a whole run on the mini base (generations file, rule metrics, judge through a local server, ``python -m
bailong.eval bench``), a two-turn conversation answered in process and through a served model (a local fake
chat-completions server: turn 2 is asked with turn 1 and the server's own answer), judged with the conversation,
metrics per turn by hand; the mc and bench evaluators together, as the SFT stage runs them."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.corpus import CorpusError
from bailong.eval.__main__ import main
from bailong.eval.bench import load_prompts, rule_scores, run_bench, summarize_rules
from conftest import ROOT, compose_config
from test_judge import FakeJudgeServer

MINI = ROOT / "models" / "mini-base"


@pytest.fixture(scope="module")
def mini():
    return AutoModelForCausalLM.from_pretrained(MINI).eval(), AutoTokenizer.from_pretrained(MINI)


def test_shipped_prompts_cover_each_category_in_both_languages(tmp_path):
    cfg = compose_config([], tmp_path)
    prompts = load_prompts(cfg.bench.prompts)
    categories = {p.category for p in prompts}
    assert {"poetry", "translation", "knowledge", "writing"} <= categories
    for category in categories:
        assert {p.lang for p in prompts if p.category == category} == {"tc", "en"}, category
    translations = [p for p in prompts if p.category == "translation"]
    assert translations and all(p.expected_langs != (p.lang,) for p in translations)
    assert all(p.expected_langs[0] == p.lang for p in prompts if p.category != "translation")
    conversations = [p for p in prompts if len(p.turns) > 1]
    assert len(conversations) == 4 and {p.category for p in conversations} == {"multi_turn"}
    assert {p.lang for p in conversations} == {"tc", "en"} and all(len(p.turns) == 2 for p in conversations)
    assert any(p.expected_langs[1] != p.lang for p in conversations)  # "translate your answer"


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"id": "a", "category": "c", "lang": "zh", "prompt": "p"}', r"p.jsonl:2: 'lang' must be one of tc, sc, en"),
        ('{"id": "a", "category": "c", "lang": "en", "prompt": ""}', r"p.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"id": "x", "category": "c", "lang": "en", "prompt": "p"}', r"p.jsonl:2: id 'x' repeats"),
        (
            '{"id": "a", "category": "c", "lang": "en", "expected_lang": "fr", "prompt": "p"}',
            r"'expected_lang' must be",
        ),
        ("[1, 2]", r"p.jsonl:2: expected a JSON object"),
        ('{"id": "a", "category": "c", "lang": "en"}', r"p.jsonl:2: give exactly one of 'prompt' .* found neither"),
        (
            '{"id": "a", "category": "c", "lang": "en", "prompt": "p", "turns": ["p"]}',
            r"p.jsonl:2: give exactly one of .* found 'prompt' and 'turns'",
        ),
        ('{"id": "a", "category": "c", "lang": "en", "turns": []}', r"p.jsonl:2: 'turns' must be a non-empty list"),
        ('{"id": "a", "category": "c", "lang": "en", "turns": "p"}', r"p.jsonl:2: 'turns' must be a non-empty list"),
        (
            '{"id": "a", "category": "c", "lang": "en", "turns": ["p", " "]}',
            r"p.jsonl:2: 'turns'\[1\] must be a non-empty string",
        ),
        ('{"id": "a", "category": "c", "lang": "en", "turns": ["p", 3]}', r"p.jsonl:2: 'turns'\[1\] must be"),
        (
            '{"id": "a", "category": "c", "lang": "en", "turns": ["p", "q"], "expected_lang": ["en"]}',
            r"p.jsonl:2: 'expected_lang' must be .* one per turn \(2\)",
        ),
        (
            '{"id": "a", "category": "c", "lang": "en", "turns": ["p", "q"], "expected_lang": ["en", "fr"]}',
            r"p.jsonl:2: 'expected_lang' must be",
        ),
        ("{oops", r"p.jsonl:2: not valid JSON"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "x", "category": "c", "lang": "en", "prompt": "p"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_prompts(path)


def test_a_conversation_has_one_expected_language_per_turn(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "category": "c", "lang": "tc", "turns": ["寫詩。", "翻成英文。"], "expected_lang": ["tc", "en"]}\n'
        '{"id": "b", "category": "c", "lang": "en", "turns": ["p", "q"], "expected_lang": "tc"}\n'
        '{"id": "c", "category": "c", "lang": "en", "prompt": "p"}\n'
    )
    a, b, c = load_prompts(path)
    assert a.turns == ("寫詩。", "翻成英文。") and a.expected_langs == ("tc", "en")
    assert b.expected_langs == ("tc", "tc") and c.turns == ("p",) and c.expected_langs == ("en",)


def test_rule_metrics_by_hand():
    rows = []
    for pid, cat, lang, exp, answer in [
        ("1", "poetry", "tc", "tc", "我們的國家很大"),  # consistent, purity 1
        ("2", "poetry", "tc", "tc", "我们的国家很大"),  # Simplified: inconsistent, purity 0
        ("3", "translation", "tc", "en", "The weather is nice."),  # asked for English: consistent
        ("4", "writing", "en", "en", "今天天氣很好"),  # answered in Chinese: inconsistent
    ]:
        rows.append(
            {
                "id": pid,
                "category": cat,
                "lang": lang,
                "turn": 1,
                "expected_lang": exp,
                "prompt": "p",
                "answer": answer,
                **rule_scores(answer, exp),
            }
        )
    m = summarize_rules(rows)
    # one-turn prompts only: the keys of the bench before conversations, none per turn
    groups = ["", "tc/", "en/", "poetry/", "translation/", "writing/"]
    assert set(m) == {
        "bench/n",
        "bench/simplified_answer_rate",
        "bench/empty_answer_rate",
        "bench/answer_chars",
        *(f"bench/{g}lang_consistency" for g in groups),
        *(f"bench/{g}traditional_purity" for g in ["", "tc/", "poetry/"]),
    }
    assert m["bench/lang_consistency"] == 0.5
    assert m["bench/tc/lang_consistency"] == pytest.approx(2 / 3) and m["bench/en/lang_consistency"] == 0.0
    assert m["bench/poetry/lang_consistency"] == 0.5 and m["bench/translation/lang_consistency"] == 1.0
    assert m["bench/traditional_purity"] == 0.5 and m["bench/poetry/traditional_purity"] == 0.5
    assert m["bench/simplified_answer_rate"] == 0.5 and m["bench/n"] == 4.0


def rule_rows(answers, turn=1) -> list[dict]:
    """Bench rows for ``(id, category, prompt language, expected language, answer)``, scored by the rules."""
    return [
        {
            "id": i,
            "category": c,
            "lang": lang,
            "turn": turn,
            "expected_lang": exp,
            "prompt": "p",
            "answer": a,
            **rule_scores(a, exp),
        }
        for i, c, lang, exp, a in answers
    ]


@pytest.mark.parametrize("penalty", [1.0, None])
def test_a_wrong_language_answer_is_rated_down_whatever_the_judge_says(tmp_path, penalty):
    """Bailong-bench's rule in code: a judge that rates every answer 9 (it ignores the rule in its prompt) still
    leaves an English answer to a TC prompt, a Simplified one, and a Chinese answer to an English prompt at 1."""
    from bailong.eval.bench import judge_rows

    rows = rule_rows(
        [
            ("1", "poetry", "tc", "tc", "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。"),
            ("2", "poetry", "tc", "tc", "床前明月光，疑是地上霜。举头望明月，低头思故乡。我们"),  # Simplified
            ("3", "knowledge", "tc", "tc", "The capital of Taiwan is Taipei."),  # English to a TC prompt
            ("4", "translation", "tc", "en", "The moon is bright."),  # asked for English: right
            ("5", "writing", "en", "en", "今天天氣很好，我們去爬山。"),  # Chinese to an English prompt
        ]
    )
    assert [r["lang_consistent"] for r in rows] == [True, False, False, True, False]
    server = FakeJudgeServer(default=("ok", "Excellent. Rating: [[9]]"))
    try:
        overrides = [f"judge.base_url={server.url}", "judge.backoff_s=0.01"]
        cfg = compose_config(
            [*overrides, f"judge.wrong_language_rating={'null' if penalty is None else penalty}"], tmp_path
        )
        metrics = judge_rows(rows, cfg.judge, tmp_path)
    finally:
        server.close()
    assert metrics["bench/judge_raw_score"] == 9.0 and metrics["bench/judge_n"] == 5.0
    if penalty is None:  # the rule off: the judge's ratings stand
        assert metrics["bench/judge_score"] == 9.0 and metrics["bench/judge_language_penalised"] == 0.0
    else:
        assert metrics["bench/judge_score"] == pytest.approx((9 + 1 + 1 + 9 + 1) / 5)
        assert metrics["bench/judge_language_penalised"] == 3.0
        assert metrics["bench/tc/judge_score"] == pytest.approx((9 + 1 + 1 + 9) / 4)
        assert metrics["bench/en/judge_score"] == 1.0 and metrics["bench/translation/judge_score"] == 9.0
    assert not [k for k in metrics if "turn" in k]  # one-turn prompts: no per-turn keys, as before


def test_run_bench_with_judge_on_the_mini_base(mini, tmp_path):
    model, tok = mini
    server = FakeJudgeServer(default=("ok", "Weak answer. Rating: [[2]]"))
    try:
        cfg = compose_config(
            ["bench.max_prompts=3", "bench.max_new_tokens=6", f"judge.base_url={server.url}", "judge.backoff_s=0.01"],
            tmp_path,
        )
        metrics = run_bench(model, tok, cfg.bench, cfg.judge, tmp_path / "bench")
    finally:
        server.close()
    rows = [json.loads(line) for line in (tmp_path / "bench" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["answer"], str) and "answer_lang" in r for r in rows)
    assert metrics["bench/n"] == 3.0 and 0.0 <= metrics["bench/lang_consistency"] <= 1.0
    # the judge rated all 2; the language rule rates each answer not in the expected language 1
    expected = [2.0 if r["lang_consistent"] else 1.0 for r in rows]
    assert metrics["bench/judge_score"] == pytest.approx(sum(expected) / 3) and metrics["bench/judge_n"] == 3.0
    assert metrics["bench/judge_raw_score"] == 2.0
    assert metrics["bench/judge_language_penalised"] == expected.count(1.0)
    assert len(server.requests) == 3
    assert json.loads((tmp_path / "bench" / "metrics.json").read_text()) == metrics


def test_cli_on_a_base_model_needs_out_and_writes_there(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", str(MINI), "--max-prompts", "1"])  # a base model directory is not a run directory
    assert "give --out" in capsys.readouterr().err
    args = ["bench", str(MINI), "--out", str(tmp_path / "b"), "--max-prompts", "2", "--quant", "none"]
    metrics = main([*args, "bench.max_new_tokens=4"])
    assert metrics["bench/n"] == 2.0 and (tmp_path / "b" / "bench" / "generations.jsonl").is_file()
    assert json.loads(capsys.readouterr().out) == metrics


def test_mc_and_bench_evaluators_return_flat_float_metrics(mini, tmp_path):
    from bailong.eval.evaluators import EvalContext, run_evaluators

    model, tok = mini
    cfg = compose_config(["mc.items_per_lang=6", "bench.max_prompts=2", "bench.max_new_tokens=4"], tmp_path)
    metrics = run_evaluators(("mc", "bench"), EvalContext.from_config(cfg, model, tok, tmp_path / "eval"))
    for key in ("mc/tc_acc", "mc/en_acc", "mc/tc_chance", "bench/lang_consistency"):
        assert isinstance(metrics[key], float), key
    assert metrics["mc/tc_n"] == 6.0 and metrics["mc/en_n"] == 6.0 and metrics["mc/tc_chance"] == 0.25
    assert "bench/judge_score" not in metrics  # no judge configured
    assert len((tmp_path / "eval" / "mc" / "tc.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "eval" / "mc" / "en_predictions.jsonl").is_file()


CONVERSATION = (
    '{"id": "conv", "category": "multi_turn", "lang": "tc", "turns": ["請介紹夜市。", "請把你的回答翻譯成英文。"], '
    '"expected_lang": ["tc", "en"]}\n'
    '{"id": "one", "category": "knowledge", "lang": "en", "prompt": "Who wrote Hamlet?"}\n'
)


def test_a_served_model_answers_each_turn_after_its_own_earlier_answers_and_is_judged_per_turn(tmp_path):
    """Turn 2 is asked with turn 1's question and the answer the server gave; each (prompt, turn) is judged, turn 2
    with the conversation before it; the metrics per turn recomputed here by hand."""
    (tmp_path / "p.jsonl").write_text(CONVERSATION)
    model = FakeJudgeServer()
    model.script = [("ok", "  夜市有很多小吃，非常熱鬧。\n"), ("ok", "Night markets have many snacks."), ("ok", "")]
    judge = FakeJudgeServer()
    judge.script = [("ok", "Good. [[8]]"), ("ok", "Fine. [[6]]"), ("ok", "Empty. [[3]]")]
    try:
        cfg = compose_config(
            [
                f"bench.prompts={tmp_path / 'p.jsonl'}",
                f"bench.server.base_url={model.url}",
                "bench.server.model=served-model",
                "bench.max_new_tokens=8",
                f"judge.base_url={judge.url}",
                "judge.backoff_s=0.01",
            ],
            tmp_path,
        )
        metrics = run_bench(None, None, cfg.bench, cfg.judge, tmp_path / "bench")
    finally:
        model.close()
        judge.close()
    first, second, third = (r["body"] for r in model.requests)
    assert second["messages"] == [
        {"role": "user", "content": "請介紹夜市。"},
        {"role": "assistant", "content": "夜市有很多小吃，非常熱鬧。"},  # the server's own answer, stripped
        {"role": "user", "content": "請把你的回答翻譯成英文。"},
    ]
    assert first["messages"] == second["messages"][:1] and third["messages"][0]["content"] == "Who wrote Hamlet?"
    assert second["model"] == "served-model" and second["max_tokens"] == 8
    assert second["temperature"] == 0.0 and "top_p" not in second  # greedy (bench.do_sample=false)
    assert [first["seed"], second["seed"], third["seed"]] == [0, 0, 1]  # bench.seed + the prompt's index

    rows = [json.loads(line) for line in (tmp_path / "bench" / "generations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["turn"], r["expected_lang"]) for r in rows] == [
        ("conv", 1, "tc"),
        ("conv", 2, "en"),
        ("one", 1, "en"),
    ]
    assert rows[2]["answer"] == "" and [r["lang_consistent"] for r in rows] == [True, True, False]

    turn1, turn2, _ = (r["body"]["messages"][1]["content"] for r in judge.requests)
    assert "[Question]\n請介紹夜市。" in turn1 and "### User:" not in turn1  # a first turn: the single template
    assert (
        "### User:\n請介紹夜市。\n\n### Assistant:\n夜市有很多小吃，非常熱鬧。\n\n### User:\n請把你的回答翻譯成英文。"
        in turn2
    )
    assert "must be written in English" in turn2 and "answer to the last user question" in turn2

    # by hand: ratings 8, 6, 3; the empty answer is not in English, so the language rule rates it 1
    assert metrics["bench/n"] == 3.0 and metrics["bench/judge_n"] == 3.0 and metrics["bench/judge_failed"] == 0.0
    assert metrics["bench/judge_raw_score"] == pytest.approx((8 + 6 + 3) / 3)
    assert metrics["bench/judge_score"] == pytest.approx((8 + 6 + 1) / 3)
    assert (
        metrics["bench/turn1/judge_score"] == pytest.approx((8 + 1) / 2) and metrics["bench/turn2/judge_score"] == 6.0
    )
    assert metrics["bench/lang_consistency"] == pytest.approx(2 / 3)
    assert metrics["bench/turn1/lang_consistency"] == 0.5 and metrics["bench/turn2/lang_consistency"] == 1.0
    assert metrics["bench/multi_turn/judge_score"] == 7.0 and metrics["bench/empty_answer_rate"] == pytest.approx(1 / 3)
    assert metrics["bench/turn1/traditional_purity"] == 1.0 and "bench/turn2/traditional_purity" not in metrics


def test_a_served_model_is_retried_and_a_refusal_stops_the_bench(tmp_path):
    from bailong.eval.bench import ServerAnswerer
    from bailong.eval.chat_client import ChatClient, ChatRequestError

    server = FakeJudgeServer(default=("ok", "An answer."))
    server.script = [("status", 503), ("raw", '{"choices": [{"message": {"content": null}}]}')]
    try:
        cfg = compose_config([f"bench.server.base_url={server.url}", "bench.do_sample=true"], tmp_path).bench
        with ChatClient(cfg.server, "bench.server", sleep=lambda s: None) as client:
            answer = ServerAnswerer(client, cfg).answer([{"role": "user", "content": "q"}], seed=3)
            assert answer == "An answer." and len(server.requests) == 3  # a 503 and a null content retried
            body = server.requests[-1]["body"]
            assert body["temperature"] == cfg.temperature and body["top_p"] == cfg.top_p and body["seed"] == 3
            server.default = ("status", 404)  # an unknown model: retrying cannot help
            with pytest.raises(ChatRequestError, match="HTTP 404"):
                ServerAnswerer(client, cfg).answer([{"role": "user", "content": "q"}], seed=3)
    finally:
        server.close()


def test_a_loaded_model_and_a_server_at_once_are_refused(tmp_path):
    cfg = compose_config(["bench.server.base_url=http://127.0.0.1:9/v1"], tmp_path)
    with pytest.raises(ValueError, match="bench.server.base_url is set and a model was loaded"):
        run_bench(object(), None, cfg.bench, cfg.judge, tmp_path / "bench")
    with pytest.raises(ValueError, match="no model to answer the bench"):
        run_bench(None, None, compose_config([], tmp_path).bench, cfg.judge, tmp_path / "bench")


def test_cli_benches_a_served_model_without_loading_one(tmp_path, capsys, monkeypatch):
    import bailong.eval.__main__ as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load_for_inference", no_loading)
    server = FakeJudgeServer(default=("ok", "An answer in English."))
    try:
        for argv, message in [
            (["bench", "--max-prompts", "1"], "give the model to evaluate"),
            (["bench", "--model-url", server.url], "a served model: give --out"),
            (["bench", str(MINI), "--model-url", server.url, "--out", str(tmp_path)], "not both"),
            (["instruct", str(MINI), "--out", str(tmp_path), f"bench.server.base_url={server.url}"], "only the bench"),
        ]:
            with pytest.raises(SystemExit):
                main(argv)
            assert message in capsys.readouterr().err, argv
        out = tmp_path / "served"
        args = ["bench", "--model-url", server.url, "--model-name", "m", "--out", str(out), "bench.max_prompts=2"]
        metrics = main([*args, "bench.max_new_tokens=16"])
    finally:
        server.close()
    assert metrics["bench/n"] == 2.0 and json.loads(capsys.readouterr().out) == metrics
    assert [r["body"]["model"] for r in server.requests] == ["m", "m"] and server.requests[0]["body"][
        "max_tokens"
    ] == 16
    assert (out / "bench" / "generations.jsonl").is_file()


def test_a_conversation_in_process_on_the_mini_base(mini, tmp_path):
    model, tok = mini
    (tmp_path / "p.jsonl").write_text(CONVERSATION)
    cfg = compose_config([f"bench.prompts={tmp_path / 'p.jsonl'}", "bench.max_new_tokens=4"], tmp_path)
    metrics = run_bench(model, tok, cfg.bench, cfg.judge, tmp_path / "bench")
    rows = [json.loads(line) for line in (tmp_path / "bench" / "generations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["turn"]) for r in rows] == [("conv", 1), ("conv", 2), ("one", 1)]
    assert metrics["bench/n"] == 3.0 and "bench/turn2/lang_consistency" in metrics


def test_a_bad_server_setting_names_its_key():
    from bailong.errors import ConfigError
    from bailong.eval.config import BenchConfig, EndpointConfig

    with pytest.raises(ConfigError, match=r"bench.server.timeout_s=0: expected a number of seconds > 0"):
        BenchConfig(server=EndpointConfig(timeout_s=0))
    with pytest.raises(
        ConfigError, match=r"bench.server.max_backoff_s=0.5: expected a number >= bench.server.backoff_s"
    ):
        BenchConfig(server=EndpointConfig(backoff_s=1.0, max_backoff_s=0.5))
