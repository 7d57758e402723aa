"""Bailong-bench-style runner: instructions by category in Traditional Chinese and English, some of them
conversations of several turns, answered by the model, scored offline by rules and, when a judge is configured,
by an LLM judge.

    python -m bailong.eval bench outputs/sft/runs/<run>                       # rules only
    python -m bailong.eval bench outputs/sft/runs/<run> --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-7b
    python -m bailong.eval bench models/mini-base --out /tmp/base_bench        # a base model (plain chat format)
    python -m bailong.eval bench --model-url http://127.0.0.1:8000/v1 --model-name bailong --out /tmp/served

Prompts file (JSON Lines): ``{"id", "category", "lang": "tc"|"en", "prompt" | "turns", "expected_lang"?}``:
``prompt`` is a one-turn instruction, ``turns`` a conversation (a list of user turns, each answered before the
next is asked: turn k is asked after the earlier turns and the model's own answers to them, as MT-Bench does).
``expected_lang`` is the language the answers must be in when it differs from the prompt's (a request to
translate into the other language); a list gives one language per turn.

Answers come from an ``Answerer``: the loaded model in process (``ModelAnswerer``, ``bailong.eval.generate``), or
a served model through its OpenAI-compatible chat-completions endpoint (``ServerAnswerer``, ``bench.server``).

Each (prompt, turn) is one scored item. Writes ``bench/generations.jsonl`` (one line per item: the prompt's
fields, ``turn`` from 1, that turn's ``prompt`` and ``answer``, its rule scores), ``bench/judgments.jsonl``
(judge ratings, resumable) and ``bench/metrics.json``; for a run directory, the ``bench/*`` keys are merged into
its ``metrics.json``.

Rule scores (``bailong.eval.consistency``): ``bench/lang_consistency`` — share of answers in the expected
language (Simplified Chinese is not Traditional); ``bench/traditional_purity`` — mean Traditional purity
of the answers expected in Traditional Chinese; both also per prompt language and per category, and, when a
prompt has more than one turn, per turn (``bench/turn1/...``, ``bench/turn2/...``). Every key is over all
scored items, so a file of one-turn prompts gives the keys and numbers it gave before conversations existed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bailong.data.corpus import CorpusError, read_jsonl
from bailong.eval.chat_client import ChatClient
from bailong.eval.consistency import LANGS, identify_language, traditional_purity
from bailong.files import write_json_atomically
from bailong.run_files import ADAPTER_DIR, METRICS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    lang: str
    turns: tuple[str, ...]  # the user's turns; one for a plain instruction
    expected_langs: tuple[str, ...]  # the language each turn's answer must be in


def _turns(where: str, record: dict) -> tuple[str, ...]:
    """The user turns of a prompts line: ``prompt`` (one) or ``turns`` (a list), exactly one of the two."""
    given = [key for key in ("prompt", "turns") if key in record]
    if len(given) != 1:
        raise CorpusError(
            f"{where}: give exactly one of 'prompt' (one turn) and 'turns' (a list of turns), found "
            f"{' and '.join(map(repr, given)) or 'neither'} (keys: {', '.join(sorted(record))})"
        )
    if given == ["prompt"]:
        turns, names = [record["prompt"]], ["'prompt'"]
    else:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise CorpusError(f"{where}: 'turns' must be a non-empty list of strings, got {turns!r}")
        names = [f"'turns'[{k}]" for k in range(len(turns))]
    for name, turn in zip(names, turns):
        if not isinstance(turn, str) or not turn.strip():
            raise CorpusError(f"{where}: {name} must be a non-empty string, got {turn!r}")
    return tuple(turns)


def load_prompts(path: str | Path) -> list[BenchPrompt]:
    """The prompts of a bench file; errors name the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bench prompts file not found")
    prompts, seen = [], set()
    for where, record in read_jsonl(path):
        for key in ("id", "category"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise CorpusError(
                    f"{where}: {key!r} must be a non-empty string (found keys: {', '.join(sorted(record))})"
                )
        turns = _turns(where, record)
        if record.get("lang") not in LANGS:
            raise CorpusError(f"{where}: 'lang' must be one of {', '.join(LANGS)}, got {record.get('lang')!r}")
        expected = record.get("expected_lang", record["lang"])
        expected_langs = expected if isinstance(expected, list) else [expected] * len(turns)
        if len(expected_langs) != len(turns) or any(e not in LANGS for e in expected_langs):
            raise CorpusError(
                f"{where}: 'expected_lang' must be one of {', '.join(LANGS)}, or a list of those with one per turn "
                f"({len(turns)}), got {expected!r}"
            )
        if record["id"] in seen:
            raise CorpusError(f"{where}: id {record['id']!r} repeats an earlier prompt's id")
        seen.add(record["id"])
        prompts.append(BenchPrompt(record["id"], record["category"], record["lang"], turns, tuple(expected_langs)))
    if not prompts:
        raise CorpusError(f"{path}: no prompts")
    return prompts


class Answerer(Protocol):
    """What answers the bench: the assistant's reply to a chat that ends with a user turn."""

    def answer(self, messages: Sequence[Mapping[str, str]], seed: int) -> str: ...


@dataclass
class ModelAnswerer:
    """The loaded model in process, through ``bailong.eval.generate`` (the chat CLI's code path)."""

    model: Any
    tokenizer: Any
    cfg: Any  # BenchConfig-like

    def answer(self, messages: Sequence[Mapping[str, str]], seed: int) -> str:
        from bailong.eval.generate import generate

        return generate(
            self.model,
            self.tokenizer,
            messages,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k,
            repetition_penalty=self.cfg.repetition_penalty,
            do_sample=self.cfg.do_sample,
            seed=seed,
        )


@dataclass
class ServerAnswerer:
    """A served model through its OpenAI-compatible endpoint (``bench.server``): greedy (``do_sample`` false) is
    temperature 0; ``top_k`` and ``repetition_penalty`` are not in the chat-completions API (see BenchConfig)."""

    client: ChatClient
    cfg: Any  # BenchConfig-like

    def answer(self, messages: Sequence[Mapping[str, str]], seed: int) -> str:
        sampling = (
            {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
            if self.cfg.do_sample
            else {"temperature": 0.0}
        )
        # the content as is, stripped as generate() strips the in-process answer. An empty answer is an answer (a
        # model that stops at once; the rules count it in bench/empty_answer_rate), not a malformed reply: greedy
        # decoding would give it again on every retry and only fail the run
        reply = self.client.complete(
            messages, str.strip, what="answer", max_tokens=self.cfg.max_new_tokens, seed=seed, **sampling
        )
        return reply.value


@contextlib.contextmanager
def open_answerer(model: Any, tokenizer: Any, bench_cfg: Any) -> Iterator[Answerer]:
    """The served model when ``bench.server.base_url`` is set, else the loaded ``model``; exactly one of them,
    so a stage's loaded model is never silently passed over for a server (or the reverse)."""
    served = bool(bench_cfg.server.base_url)
    if served and model is not None:
        raise ValueError(
            "bench.server.base_url is set and a model was loaded: the bench answers with one of them "
            "(bench.server.base_url=null for the loaded model)"
        )
    if not served and model is None:
        raise ValueError("no model to answer the bench: load one, or set bench.server.base_url (--model-url)")
    if not served:
        yield ModelAnswerer(model, tokenizer, bench_cfg)
        return
    with ChatClient(bench_cfg.server, "bench.server") as client:
        yield ServerAnswerer(client, bench_cfg)


def rule_scores(answer: str, expected_lang: str) -> dict:
    """Per-answer rule scores: detected language, consistency, Traditional purity (TC answers only)."""
    detected = identify_language(answer)
    return {
        "answer_lang": detected,
        "lang_consistent": detected == expected_lang,
        "traditional_purity": traditional_purity(answer) if expected_lang == "tc" else None,
    }


def generate_answers(answerer: Answerer, prompts: Sequence[BenchPrompt], bench_cfg: Any, out_path: Path) -> list[dict]:
    """Answer every turn of every prompt and write ``generations.jsonl``, one line per (prompt, turn).

    Turn k is asked after the earlier user turns and the answerer's own answers to them (MT-Bench), with the
    prompt's seed for every turn, so a one-turn prompt is answered exactly as before conversations existed."""
    rows = []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as out:
        for k, p in enumerate(prompts):
            messages = [{"role": "system", "content": bench_cfg.system_prompt}] if bench_cfg.system_prompt else []
            for turn, (question, expected_lang) in enumerate(zip(p.turns, p.expected_langs), start=1):
                messages.append({"role": "user", "content": question})
                answer = answerer.answer(messages, seed=bench_cfg.seed + k)
                messages.append({"role": "assistant", "content": answer})
                row = {
                    "id": p.id,
                    "category": p.category,
                    "lang": p.lang,
                    "turn": turn,
                    "prompt": question,
                    "expected_lang": expected_lang,
                    "answer": answer,
                    **rule_scores(answer, expected_lang),
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                rows.append(row)
    return rows


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def groups(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """The items each metric is reported over, by key prefix: all (``""``), per prompt language and category
    (``tc/``, ``poetry/``), and per turn (``turn1/``, ...) when some prompt has more than one."""
    found = {"": list(rows)}
    keys = ("lang", "category", "turn") if any(r["turn"] > 1 for r in rows) else ("lang", "category")
    for key in keys:
        for value in sorted({r[key] for r in rows}):
            found[f"turn{value}/" if key == "turn" else f"{value}/"] = [r for r in rows if r[key] == value]
    return found


def summarize_rules(rows: Sequence[dict]) -> dict[str, float]:
    """``bench/lang_consistency``, ``bench/traditional_purity`` over all items and by group (``groups``)."""
    metrics: dict[str, float] = {"bench/n": float(len(rows))}
    for prefix, group in groups(rows).items():
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


def _item(row: Mapping[str, Any]) -> tuple[str, int]:
    return row["id"], row["turn"]


def judge_rows(rows: Sequence[dict], judge_cfg: Any, out_dir: Path) -> dict[str, float]:
    """Judge every item (resumable, ``judgments.jsonl``), a later turn with the conversation before it;
    ``bench/judge_score`` overall and by group (``groups``)."""
    from bailong.eval.judge import Judge, judge_answers

    answers, earlier = [], {}
    for r in rows:  # rows in turn order: each conversation's context is its earlier rows
        context = earlier.setdefault(r["id"], [])
        answers.append(
            {
                "id": r["id"],
                "turn": r["turn"],
                "question": r["prompt"],
                "answer": r["answer"],
                "expected_lang": r["expected_lang"],
                "context": list(context),
            }
        )
        context.append((r["prompt"], r["answer"]))
    with Judge(judge_cfg) as judge:
        results, failed = judge_answers(judge, answers, out_dir / "judgments.jsonl")
    judged = {(r["id"], r["turn"]): r["rating"] for r in results}
    rating = dict(judged)
    # the language rule in code: a judge that ignores its prompt's rule cannot rate a wrong-language answer up
    penalised = []
    if judge_cfg.wrong_language_rating is not None:
        penalised = [_item(r) for r in rows if _item(r) in rating and not r["lang_consistent"]]
        rating.update(dict.fromkeys(penalised, float(judge_cfg.wrong_language_rating)))
    metrics = {
        "bench/judge_n": float(len(rating)),
        "bench/judge_failed": float(failed),
        "bench/judge_language_penalised": float(len(penalised)),
    }
    if not rating:
        return metrics
    metrics["bench/judge_raw_score"] = _mean(list(judged.values()))  # the judge's ratings before the rule
    for prefix, group in groups(rows).items():
        score = _mean([rating.get(_item(r)) for r in group])
        if score is not None:
            metrics[f"bench/{prefix}judge_score"] = score
    return metrics


def run_bench(model: Any, tokenizer: Any, bench_cfg: Any, judge_cfg: Any, out_dir: str | Path) -> dict[str, float]:
    """Generate (the loaded ``model``, or the served one of ``bench.server``: ``open_answerer``), score by rules
    and (if ``judge_cfg.base_url``) by the judge; files under ``out_dir``."""
    out = Path(out_dir)
    judging = judge_cfg is not None and bool(judge_cfg.base_url)
    if judging:  # a bad judge setting fails now, not after generating every answer
        from bailong.eval.judge import check_judge_config

        check_judge_config(judge_cfg)
    prompts = load_prompts(bench_cfg.prompts)[: bench_cfg.max_prompts or None]
    with open_answerer(model, tokenizer, bench_cfg) as answerer:
        rows = generate_answers(answerer, prompts, bench_cfg, out / "generations.jsonl")
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
