"""Evaluation settings: held-out bits/char (``eval``), multiple choice (``mc``), the bench (``bench``) and the
LLM judge (``judge``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from bailong.data.config import CorpusConfig


@dataclass
class EvalConfig:
    batch_size: int = 8
    seq_len: int | None = None  # default: data.seq_len
    base: bool = True  # also score the base model with the base tokenizer (cached)


@dataclass
class MCConfig:
    """Multiple choice by log-likelihood (bailong/eval/choice.py): sets generated from held-out text
    (bailong/eval/mc_sets.py) plus any MC files in the documented JSONL format."""

    name: str = "held_out"
    tc_sources: list[CorpusConfig] = field(default_factory=list)  # held-out documents → "next line" items
    en_sources: list[CorpusConfig] = field(default_factory=list)
    items_per_lang: int = 200
    num_choices: int = 4
    context_lines: int = 2  # lines of the document before the answer line
    en_length_tolerance: float = 0.2  # English distractors within ±20% of the answer's characters
    seed: int = 0
    files: list[str] = field(default_factory=list)  # extra MC files: metrics mc/<file stem>_acc
    max_len: int = 256  # tokens per scored question + choice (question cut from the left)
    batch_size: int = 16


@dataclass
class BenchConfig:
    """Bailong-bench-style runner (bailong/eval/bench.py): prompts by category in both languages."""

    name: str = "default"
    prompts: str = MISSING  # JSONL: {"id", "category", "lang", "prompt", "expected_lang"?}
    system_prompt: str | None = None
    max_new_tokens: int = 128
    do_sample: bool = False  # greedy by default: rule scores do not move between runs
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    seed: int = 0
    max_prompts: int | None = None


@dataclass
class JudgeConfig:
    """LLM judge through an OpenAI-compatible chat-completions endpoint (bailong/eval/judge.py).
    Off while ``base_url`` is null. The API key is read from the environment variable ``api_key_env``
    and never stored in configs or outputs."""

    name: str = "mt_bench_single"
    base_url: str | None = None  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = "gpt-4o-mini"
    api_key_env: str = "JUDGE_API_KEY"
    system_prompt: str = ""
    prompt_template: str = MISSING  # {question} {answer} {expected_language}
    rating_pattern: str = "\\[\\[(\\d+\\.?\\d*)\\]\\]"
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout_s: float = (
        60.0  # per attempt, wall clock: connect, send and the whole reply (a trickling server is cut off)
    )
    max_retries: int = 4  # attempts after the first, on timeouts, 429/5xx and malformed replies
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k, at most max_backoff_s
    max_backoff_s: float = 30.0
