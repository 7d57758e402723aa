"""Evaluation settings: held-out bits/char (``eval``), multiple choice (``mc``), the bench (``bench``, with the
served model it may answer through, ``bench.server``), the LLM judge (``judge``), and the paper's sampling
settings (``PAPER_SAMPLING``).

Each dataclass checks its ranges in ``__post_init__`` and raises ``ConfigError`` naming the full key, the value
and what was expected. Only resolved values are checked: OmegaConf builds the schema's defaults by calling these
classes with MISSING (``???``) and interpolations (``${...}``), which ``bailong.errors.check_number`` skips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from bailong.data.config import CorpusConfig
from bailong.data.windows import MIN_SEQ_LEN
from bailong.errors import ConfigError, check_choice, check_number, unset


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one generation."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1


# the sampling of the paper's examples: the one definition generate(), the chat CLI, the export's
# generation_config.json and the bench's defaults take their numbers from
PAPER_SAMPLING = SamplingConfig()


def _positive(v: float) -> bool:
    return v > 0


def _at_least(n: int):
    return lambda v: v >= n


@dataclass
class EvalConfig:
    batch_size: int = 8
    # positions per scoring window (bailong/data/windows.py); null: the model's max_position_embeddings, so every
    # document that fits is scored whole and longer ones get the same character windows whatever the tokenizer
    seq_len: int | None = None
    base: bool = True  # also score the base model with the base tokenizer (cached)
    # pre-training also scores the parallel set (parallel.*) wherever it scores bits/char (base, step0, final):
    # the same content in TC and EN, so the information parity the extension is meant to improve (parallel/*)
    parallel: bool = True

    def __post_init__(self) -> None:
        check_number("eval.batch_size", self.batch_size, _at_least(1), "an integer >= 1")
        check_number(
            "eval.seq_len",
            self.seq_len,
            _at_least(MIN_SEQ_LEN),
            f"null (the model's max_position_embeddings) or an integer >= {MIN_SEQ_LEN}",
            optional=True,
        )


@dataclass
class MCConfig:
    """Multiple choice by log-likelihood (bailong/eval/choice.py): sets generated from the test split
    (bailong/eval/mc_sets.py) plus any MC files in the documented JSONL format."""

    name: str = "held_out"
    # corpora of data.tc / data.en, by path: their prepared test documents → "next line" items
    tc_sources: list[CorpusConfig] = field(default_factory=list)
    en_sources: list[CorpusConfig] = field(default_factory=list)
    items_per_lang: int = 200
    num_choices: int = 4
    context_lines: int = 2  # lines of the document before the answer line
    en_length_tolerance: float = 0.2  # English distractors within ±20% of the answer's characters
    seed: int = 0
    files: list[str] = field(default_factory=list)  # extra MC files: metrics mc/<file stem>_acc
    max_len: int = 256  # tokens per scored question + choice (question cut from the left)
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_number("mc.items_per_lang", self.items_per_lang, _at_least(1), "an integer >= 1")
        check_number("mc.num_choices", self.num_choices, _at_least(2), "an integer >= 2")
        # the question is the lines before the answer: without one, an item asks nothing (mc_sets refuses 0)
        check_number("mc.context_lines", self.context_lines, _at_least(1), "an integer >= 1")
        check_number("mc.max_len", self.max_len, _at_least(2), "an integer >= 2")
        check_number("mc.batch_size", self.batch_size, _at_least(1), "an integer >= 1")
        check_number(
            "mc.en_length_tolerance", self.en_length_tolerance, _at_least(0), "a number >= 0 (0.2: within ±20%)"
        )


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat-completions endpoint (bailong/eval/chat_client.py): the judge's settings
    (``judge.*``, ``JudgeConfig`` extends this) and a served model's (``bench.server.*``) are these fields, so
    both are written and checked once. Off while ``base_url`` is null. The API key is read from the environment
    variable ``api_key_env`` (empty: no key) and never stored in configs or outputs."""

    base_url: str | None = None  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = "bailong"  # the request's "model"
    api_key_env: str = ""
    # per attempt, wall clock: connect, send and the whole reply (a trickling server is cut off)
    timeout_s: float = 60.0
    max_retries: int = 4  # attempts after the first, on timeouts, 429/5xx and malformed replies
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k, at most max_backoff_s
    max_backoff_s: float = 30.0

    def check_endpoint(self, key: str) -> None:
        """The ranges, named under the config key ``key`` (``judge``, ``bench.server``); called by the owner's
        ``__post_init__``, which knows the key."""
        check_number(f"{key}.timeout_s", self.timeout_s, _positive, "a number of seconds > 0")
        check_number(f"{key}.max_retries", self.max_retries, _at_least(0), "an integer >= 0")
        check_number(f"{key}.backoff_s", self.backoff_s, _at_least(0), "a number of seconds >= 0")
        check_number(f"{key}.max_backoff_s", self.max_backoff_s, _at_least(0), "a number of seconds >= 0")
        if not (unset(self.backoff_s) or unset(self.max_backoff_s)) and self.max_backoff_s < self.backoff_s:
            raise ConfigError(
                f"{key}.max_backoff_s={self.max_backoff_s!r}: expected a number >= {key}.backoff_s ({self.backoff_s})"
            )


@dataclass
class BenchConfig:
    """Bailong-bench-style runner (bailong/eval/bench.py): prompts by category in both languages, some of them
    conversations of several turns. Answered by the loaded model, or, when ``server.base_url`` is set, by a model
    served behind an OpenAI-compatible endpoint (``transformers serve``, llama.cpp's server, vLLM); a served
    model gets ``max_new_tokens`` as ``max_tokens``, ``temperature`` and ``top_p`` (temperature 0 when
    ``do_sample`` is false) and the seed, but not ``top_k`` or ``repetition_penalty``, which the chat-completions
    API does not have: the server's own defaults apply to those."""

    name: str = "default"
    # JSONL: {"id", "category", "lang", "prompt" | "turns", "expected_lang"?} (bailong/eval/bench.py)
    prompts: str = MISSING
    system_prompt: str | None = None
    max_new_tokens: int = 128
    do_sample: bool = False  # greedy by default: rule scores do not move between runs
    temperature: float = PAPER_SAMPLING.temperature
    top_p: float = PAPER_SAMPLING.top_p
    top_k: int = PAPER_SAMPLING.top_k
    repetition_penalty: float = PAPER_SAMPLING.repetition_penalty
    seed: int = 0
    max_prompts: int | None = None
    # the served model (python -m bailong.eval bench --model-url URL --model-name NAME); off while base_url is null.
    # A first request may load the model on the server, hence the longer attempt
    server: EndpointConfig = field(default_factory=lambda: EndpointConfig(timeout_s=300.0))

    def __post_init__(self) -> None:
        check_number("bench.max_new_tokens", self.max_new_tokens, _at_least(1), "an integer >= 1")
        check_number("bench.temperature", self.temperature, _positive, "a number > 0")
        check_number("bench.top_p", self.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
        check_number("bench.top_k", self.top_k, _at_least(0), "an integer >= 0 (0: no top-k cut)")
        check_number("bench.repetition_penalty", self.repetition_penalty, _positive, "a number > 0 (1: none)")
        check_number(
            "bench.max_prompts", self.max_prompts, _at_least(1), "null (all) or an integer >= 1", optional=True
        )
        self.server.check_endpoint("bench.server")


@dataclass
class ParallelConfig:
    """The Traditional Chinese – English parallel set (bailong/eval/parallel_set.py) and what is scored on it
    (bailong/eval/parallel.py): bits per character of the same content in each language (``parallel_bpc``) and
    translation each way, scored by chrF (``translation``)."""

    name: str = "libreoffice_help"
    file: str = MISSING  # JSONL(.gz): {"tc", "en", "page", "id", "split"}
    split: str = "test"  # dev: for choices (prompt wording, decoding); test: what is reported
    max_pairs: int | None = 500  # scored for bits/char (null: all of the split)
    translate_pairs: int = 32  # translated each way, greedily
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        check_choice("parallel.split", self.split, ("dev", "test"))
        check_number("parallel.max_pairs", self.max_pairs, _at_least(1), "null (all) or an integer >= 1", optional=True)
        check_number("parallel.translate_pairs", self.translate_pairs, _at_least(1), "an integer >= 1")
        check_number("parallel.max_new_tokens", self.max_new_tokens, _at_least(1), "an integer >= 1")


HARNESS_TASKS = ("bailong_mc_tc", "bailong_mc_en", "tmmluplus_local", "ttqa_local")


@dataclass
class HarnessConfig:
    """lm-evaluation-harness on the model (bailong/eval/harness.py; ``pip install -e '.[harness]'``): the task YAMLs
    of bailong/eval/harness_tasks/ with their data files set here; nothing is downloaded."""

    name: str = "default"
    # bailong_mc_tc / bailong_mc_en: the held-out MC sets ``mc`` builds; tmmluplus_local: ``tmmluplus_files``;
    # ttqa_local: ``ttqa_files``
    tasks: list[str] = field(default_factory=lambda: ["bailong_mc_tc", "bailong_mc_en"])
    tmmluplus_files: list[str] = field(default_factory=list)  # CSV: question,A,B,C,D,answer
    ttqa_files: list[str] = field(default_factory=list)  # JSON: [{examples, correct_answers: [...]}, ...]
    num_fewshot: int = 0
    limit: int | None = None  # items per task (null: all)
    batch_size: int = 8

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in HARNESS_TASKS and not unset(t)]
        if unknown:
            raise ConfigError(f"harness.tasks: {unknown}: expected some of {', '.join(HARNESS_TASKS)}")
        check_number("harness.num_fewshot", self.num_fewshot, _at_least(0), "an integer >= 0")
        check_number("harness.limit", self.limit, _at_least(1), "null (all) or an integer >= 1", optional=True)
        check_number("harness.batch_size", self.batch_size, _at_least(1), "an integer >= 1")


@dataclass
class JudgeConfig(EndpointConfig):
    """LLM judge through an OpenAI-compatible chat-completions endpoint (bailong/eval/judge.py): the endpoint's
    fields (``EndpointConfig``) flat under ``judge.*``, then the grading. Off while ``base_url`` is null."""

    name: str = "mt_bench_single"
    model: str = "gpt-4o-mini"
    api_key_env: str = "JUDGE_API_KEY"
    system_prompt: str = ""
    prompt_template: str = MISSING  # a conversation's first turn: {question} {answer} {expected_language}
    # a later turn: {conversation} (the earlier turns) {question} {answer} {expected_language}
    multi_turn_template: str = MISSING
    rating_pattern: str = "\\[\\[(\\d+\\.?\\d*)\\]\\]"
    temperature: float = 0.0
    max_tokens: int = 1024
    # Bailong-bench's language rule, applied in code whatever the judge replied: an answer not in the expected
    # language (Simplified Chinese where Traditional is expected included; bailong/eval/consistency.py) gets this
    # rating; null: the judge's rating stands (its prompt still states the rule)
    wrong_language_rating: float | None = 1.0

    def __post_init__(self) -> None:
        check_number(
            "judge.wrong_language_rating",
            self.wrong_language_rating,
            lambda v: 1 <= v <= 10,
            "null or a rating in [1, 10]",
            optional=True,
        )
        self.check_endpoint("judge")
        check_number("judge.max_tokens", self.max_tokens, _at_least(1), "an integer >= 1")
        check_number("judge.temperature", self.temperature, _at_least(0), "a number >= 0")
