"""The bench runner: the shipped prompts file, prompt-file errors, rule scores by hand, and a whole run on
the mini base (generations file, rule metrics, judge through a local server, ``python -m bailong.eval bench``);
the mc and bench evaluators together, as the SFT stage runs them."""

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
    assert translations and all(p.expected_lang != p.lang for p in translations)
    assert all(p.expected_lang == p.lang for p in prompts if p.category != "translation")


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
        ("{oops", r"p.jsonl:2: not valid JSON"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "x", "category": "c", "lang": "en", "prompt": "p"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_prompts(path)


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
                "expected_lang": exp,
                "prompt": "p",
                "answer": answer,
                **rule_scores(answer, exp),
            }
        )
    m = summarize_rules(rows)
    assert m["bench/lang_consistency"] == 0.5
    assert m["bench/tc/lang_consistency"] == pytest.approx(2 / 3) and m["bench/en/lang_consistency"] == 0.0
    assert m["bench/poetry/lang_consistency"] == 0.5 and m["bench/translation/lang_consistency"] == 1.0
    assert m["bench/traditional_purity"] == 0.5 and m["bench/poetry/traditional_purity"] == 0.5
    assert m["bench/simplified_answer_rate"] == 0.5 and m["bench/n"] == 4.0


def rule_rows(answers) -> list[dict]:
    """Bench rows for ``(id, category, prompt language, expected language, answer)``, scored by the rules."""
    return [
        {"id": i, "category": c, "lang": lang, "expected_lang": exp, "prompt": "p", "answer": a, **rule_scores(a, exp)}
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
