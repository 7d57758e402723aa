"""lm-evaluation-harness (bailong/eval/harness.py) on the mini base: on the same held-out items, lm-eval's
log-likelihoods are bailong's plus one term per item (the question's newline, which lm-eval scores with the
continuation), so its acc_norm equals bailong's accuracy wherever an item's choices are equally long; the
TMMLU+-layout task reads local CSV files."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.corpus import read_jsonl
from bailong.data.windows import collate_windows
from bailong.errors import ConfigError
from bailong.eval.bpc import score_batch, scoring_mode
from bailong.eval.choice import choice_windows, load_mc_file, score_choices
from bailong.eval.config import HarnessConfig
from bailong.eval.evaluators import EvalContext, run_evaluators
from conftest import ROOT, compose_config

pytest.importorskip("lm_eval", reason="the harness extra: pip install -e '.[harness]'")

MINI = ROOT / "models" / "mini-base"


@pytest.fixture(scope="module")
def mini():
    return AutoModelForCausalLM.from_pretrained(MINI).eval(), AutoTokenizer.from_pretrained(MINI)


def context(mini, out, *overrides) -> EvalContext:
    model, tok = mini
    return EvalContext.from_config(compose_config(list(overrides), out), model, tok, out)


def bailong_bits(model, tok, items) -> list[list[float]]:
    """Each choice's bits given BOS + question, as bailong.eval.choice scores it."""
    out = []
    with scoring_mode(model):
        for item in items:
            windows = choice_windows(tok, item, max_len=256)
            out.append(score_batch(model, collate_windows(windows)).tolist())
    return out


def test_lm_eval_scores_bailongs_items_as_bailong_does(mini, tmp_path):
    ctx = context(mini, tmp_path, "mc.items_per_lang=24", "harness.batch_size=4")
    metrics = run_evaluators(["harness"], ctx)
    model, tok = mini
    for lang in ("tc", "en"):
        task = f"bailong_mc_{lang}"
        items = load_mc_file(tmp_path / "harness" / f"{task}.jsonl")
        samples = [s for _, s in read_jsonl(tmp_path / "harness" / f"samples_{task}.jsonl")]
        assert len(samples) == len(items) == 24 and metrics[f"harness/{task}_n"] == 24
        bits = bailong_bits(model, tok, items)
        same_prediction = []
        for sample, item, item_bits in zip(sorted(samples, key=lambda s: s["doc_id"]), items, bits):
            assert sample["target"] == item.answer
            # lm-eval's log-likelihood (nats) minus bailong's: one constant per item, the newline's
            extra = [ll + b * math.log(2) for ll, b in zip(sample["loglikelihoods"], item_bits)]
            assert max(extra) - min(extra) < 1e-3, extra
            assert extra[0] < 0  # it is a log-probability: the newline costs something
            ours = min(range(len(item.choices)), key=lambda k: item_bits[k] / len(item.choices[k]))
            theirs = max(range(len(item.choices)), key=lambda k: sample["loglikelihoods"][k] / len(item.choices[k]))
            if len({len(c) for c in item.choices}) == 1:
                assert ours == theirs  # equal lengths: the constant cannot change the ranking
            same_prediction.append(ours == theirs)
        accuracy = score_choices(model, tok, items, max_len=256).accuracy
        acc_norm = metrics[f"harness/{task}_acc_norm"]
        if all(same_prediction):
            assert acc_norm == pytest.approx(accuracy, abs=1e-12)
        if lang == "tc":  # the poem distractors are exactly as long as the answer
            assert all(same_prediction) and acc_norm == pytest.approx(accuracy, abs=1e-12)


def test_tmmluplus_layout_csv_is_read_locally(mini, tmp_path):
    csv = tmp_path / "geography.csv"
    csv.write_text(
        "question,A,B,C,D,answer\n"
        "臺灣最高的山是哪一座？,玉山,雪山,合歡山,阿里山,A\n"
        "臺北位於臺灣的哪一部分？,南部,北部,東部,離島,B\n"
        "下列何者是臺灣的離島？,花蓮,臺中,澎湖,嘉義,C\n",
        encoding="utf-8",
    )
    ctx = context(mini, tmp_path, "harness.tasks=[tmmluplus_local]", f"harness.tmmluplus_files=[{csv}]")
    metrics = run_evaluators(["harness"], ctx)
    assert metrics["harness/tmmluplus_local_n"] == 3 and 0 <= metrics["harness/tmmluplus_local_acc"] <= 1
    targets = [s["target"] for _, s in read_jsonl(tmp_path / "harness" / "samples_tmmluplus_local.jsonl")]
    assert sorted(targets) == [0, 1, 2]  # the letters A, B, C as choice indices


TTQA_ITEMS = [  # TTQA's layout (Taiwan-LLM's evaluation/TTQA_*.json), written for this test
    {"examples": "臺灣最高的山，海拔三千九百多公尺，日治時期稱新高山。\n該山岳的名稱是：", "correct_answers": ["玉山"]},
    {"examples": "位於南投縣魚池鄉的湖泊，是臺灣本島最大的半天然湖泊。該景點的名稱是：", "correct_answers": ["日月潭"]},
    {
        "examples": "臺北市信義區的超高層摩天大樓，地上一百零一層。\n該建築的名稱是：",
        "correct_answers": ["台北101", "臺北101"],
    },
]


def test_ttqa_layout_is_generated_and_scored_by_containment(mini, tmp_path):
    import importlib.util

    from bailong.eval.harness import TASKS_DIR

    path = tmp_path / "ttqa.json"
    path.write_text(json.dumps(TTQA_ITEMS, ensure_ascii=False), encoding="utf-8")
    ctx = context(mini, tmp_path, "harness.tasks=[ttqa_local]", f"harness.ttqa_files=[{path}]")
    metrics = run_evaluators(["harness"], ctx)
    samples = sorted(
        (s for _, s in read_jsonl(tmp_path / "harness" / "samples_ttqa_local.jsonl")), key=lambda s: s["doc_id"]
    )
    assert metrics["harness/ttqa_local_n"] == len(samples) == 3 and "harness/ttqa_local_acc_norm" not in metrics
    # the accuracy is the share of answers containing an accepted name, recomputed from the logged answers
    right = [any(name in s["response"] for name in item["correct_answers"]) for s, item in zip(samples, TTQA_ITEMS)]
    assert metrics["harness/ttqa_local_acc"] == pytest.approx(sum(right) / 3)
    spec = importlib.util.spec_from_file_location("ttqa_utils", TASKS_DIR / "ttqa_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.process_results(TTQA_ITEMS[2], ["它是臺北101。"]) == {"acc": 1.0}
    assert utils.process_results(TTQA_ITEMS[2], ["它是台北一〇一"]) == {"acc": 0.0}
    assert utils.process_results(TTQA_ITEMS[1], ["日月潭"]) == {"acc": 1.0}


def test_harness_settings_fail_with_the_key(mini, tmp_path):
    with pytest.raises(ConfigError, match=r"harness.tasks: \['mmlu'\]: expected some of bailong_mc_tc"):
        HarnessConfig(tasks=["mmlu"])
    ctx = context(mini, tmp_path, "harness.tasks=[tmmluplus_local]")
    with pytest.raises(FileNotFoundError, match="tmmluplus_local needs local CSV files"):
        run_evaluators(["harness"], ctx)
    ctx = context(mini, tmp_path, "harness.tasks=[ttqa_local]", "harness.ttqa_files=[/no/such.json]")
    with pytest.raises(FileNotFoundError, match=r"ttqa_files: \['/no/such.json'\]: ttqa_local needs local JSON"):
        run_evaluators(["harness"], ctx)
