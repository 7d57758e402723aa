"""Bailong-bench-style runner: instructions by category in Traditional Chinese and English, answered by
the model, scored offline by rules and, when a judge is configured, by an LLM judge.

    python -m bailong.eval bench outputs/sft/runs/<run>                       # rules only
    python -m bailong.eval bench outputs/sft/runs/<run> --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-7b
    python -m bailong.eval bench models/mini-base --out /tmp/base_bench        # a base model (plain chat format)

Prompts file (JSON Lines): ``{"id", "category", "lang": "tc"|"en", "prompt", "expected_lang"?}``;
``expected_lang`` is the language the answer must be in when it differs from the prompt's (a request to
translate into the other language). Writes ``bench/generations.jsonl`` (one answer per line with its rule
scores), ``bench/judgments.jsonl`` (judge ratings, resumable) and ``bench/metrics.json``; for a run
directory, the ``bench/*`` keys are merged into its ``metrics.json``.

Rule scores (``bailong.eval.consistency``): ``bench/lang_consistency`` — share of answers in the expected
language (Simplified Chinese is not Traditional); ``bench/traditional_purity`` — mean Traditional purity
of the answers expected in Traditional Chinese; both also per prompt language and per category.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bailong.data.corpus import CorpusError, read_jsonl
from bailong.eval.consistency import LANGS, identify_language, traditional_purity
from bailong.files import write_json_atomically
from bailong.run_files import ADAPTER_DIR, METRICS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    lang: str
    prompt: str
    expected_lang: str


def load_prompts(path: str | Path) -> list[BenchPrompt]:
    """The prompts of a bench file; errors name the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bench prompts file not found")
    prompts, seen = [], set()
    for where, record in read_jsonl(path):
        for key in ("id", "category", "prompt"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise CorpusError(
                    f"{where}: {key!r} must be a non-empty string (found keys: {', '.join(sorted(record))})"
                )
        for key in ("lang", "expected_lang"):
            value = record.get(key, record.get("lang")) if key == "expected_lang" else record.get(key)
            if value not in LANGS:
                raise CorpusError(f"{where}: {key!r} must be one of {', '.join(LANGS)}, got {value!r}")
        if record["id"] in seen:
            raise CorpusError(f"{where}: id {record['id']!r} repeats an earlier prompt's id")
        seen.add(record["id"])
        prompts.append(
            BenchPrompt(
                record["id"],
                record["category"],
                record["lang"],
                record["prompt"],
                record.get("expected_lang", record["lang"]),
            )
        )
    if not prompts:
        raise CorpusError(f"{path}: no prompts")
    return prompts


def rule_scores(answer: str, expected_lang: str) -> dict:
    """Per-answer rule scores: detected language, consistency, Traditional purity (TC answers only)."""
    detected = identify_language(answer)
    return {
        "answer_lang": detected,
        "lang_consistent": detected == expected_lang,
        "traditional_purity": traditional_purity(answer) if expected_lang == "tc" else None,
    }


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[BenchPrompt], bench_cfg: Any, out_path: Path
) -> list[dict]:
    """Answer every prompt (``bailong.eval.generate``) and write ``generations.jsonl``, one line each."""
    from bailong.eval.generate import generate

    rows = []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as out:
        for k, p in enumerate(prompts):
            messages = [{"role": "system", "content": bench_cfg.system_prompt}] if bench_cfg.system_prompt else []
            messages.append({"role": "user", "content": p.prompt})
            answer = generate(
                model,
                tokenizer,
                messages,
                max_new_tokens=bench_cfg.max_new_tokens,
                temperature=bench_cfg.temperature,
                top_p=bench_cfg.top_p,
                top_k=bench_cfg.top_k,
                repetition_penalty=bench_cfg.repetition_penalty,
                do_sample=bench_cfg.do_sample,
                seed=bench_cfg.seed + k,
            )
            row = {**asdict(p), "answer": answer, **rule_scores(answer, p.expected_lang)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            rows.append(row)
    return rows


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize_rules(rows: Sequence[dict]) -> dict[str, float]:
    """``bench/lang_consistency``, ``bench/traditional_purity`` overall, per prompt language, per category."""
    metrics: dict[str, float] = {"bench/n": float(len(rows))}
    groups = {"": rows}
    for key in ("lang", "category"):
        for value in sorted({r[key] for r in rows}):
            groups[f"{value}/"] = [r for r in rows if r[key] == value]
    for prefix, group in groups.items():
        metrics[f"bench/{prefix}lang_consistency"] = _mean([r["lang_consistent"] for r in group])
        purity = _mean([r["traditional_purity"] for r in group])
        if purity is not None:
            metrics[f"bench/{prefix}traditional_purity"] = purity
    tc_expected = [r for r in rows if r["expected_lang"] == "tc"]
    if tc_expected:
        metrics["bench/simplified_answer_rate"] = _mean([r["answer_lang"] == "sc" for r in tc_expected])
    metrics["bench/empty_answer_rate"] = _mean([not r["answer"].strip() for r in rows])
    metrics["bench/answer_chars"] = _mean([len(r["answer"]) for r in rows])
    return metrics


def judge_rows(rows: Sequence[dict], judge_cfg: Any, out_dir: Path) -> dict[str, float]:
    """Judge every answer (resumable, ``judgments.jsonl``); ``bench/judge_score`` overall and by group."""
    from bailong.eval.judge import Judge, judge_answers

    answers = [
        {"id": r["id"], "question": r["prompt"], "answer": r["answer"], "expected_lang": r["expected_lang"]}
        for r in rows
    ]
    with Judge(judge_cfg) as judge:
        results, failed = judge_answers(judge, answers, out_dir / "judgments.jsonl")
    judged = {r["id"]: r["rating"] for r in results}
    rating = dict(judged)
    # the language rule in code: a judge that ignores its prompt's rule cannot rate a wrong-language answer up
    penalised = []
    if judge_cfg.wrong_language_rating is not None:
        penalised = [r["id"] for r in rows if r["id"] in rating and not r["lang_consistent"]]
        rating.update(dict.fromkeys(penalised, float(judge_cfg.wrong_language_rating)))
    metrics = {
        "bench/judge_n": float(len(rating)),
        "bench/judge_failed": float(failed),
        "bench/judge_language_penalised": float(len(penalised)),
    }
    if not rating:
        return metrics
    metrics["bench/judge_score"] = _mean(list(rating.values()))
    metrics["bench/judge_raw_score"] = _mean(list(judged.values()))  # the judge's ratings before the rule
    for key in ("lang", "category"):
        for value in sorted({r[key] for r in rows}):
            score = _mean([rating.get(r["id"]) for r in rows if r[key] == value])
            if score is not None:
                metrics[f"bench/{value}/judge_score"] = score
    return metrics


def run_bench(model: Any, tokenizer: Any, bench_cfg: Any, judge_cfg: Any, out_dir: str | Path) -> dict[str, float]:
    """Generate, score by rules and (if ``judge_cfg.base_url``) by the judge; files under ``out_dir``."""
    out = Path(out_dir)
    judging = judge_cfg is not None and bool(judge_cfg.base_url)
    if judging:  # a bad judge setting fails now, not after generating every answer
        from bailong.eval.judge import check_judge_config

        check_judge_config(judge_cfg)
    prompts = load_prompts(bench_cfg.prompts)[: bench_cfg.max_prompts or None]
    rows = generate_answers(model, tokenizer, prompts, bench_cfg, out / "generations.jsonl")
    metrics = summarize_rules(rows)
    if judging:
        metrics.update(judge_rows(rows, judge_cfg, out))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    return metrics


def is_run_dir(path: Path) -> bool:
    return (path / ADAPTER_DIR / "adapter_config.json").is_file()


def merge_metrics(run_dir: Path, new: dict) -> None:
    """Add ``new`` keys to ``run_dir/metrics.json`` (atomically: a reader sees the old file or the new one)."""
    path = run_dir / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(new)
    write_json_atomically(path, metrics)
