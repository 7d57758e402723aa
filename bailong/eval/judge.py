"""LLM judge: MT-Bench-style single-answer grading (1-10) through any OpenAI-compatible endpoint.

One ``POST {judge.base_url}/chat/completions`` per answer with the prompt of ``conf/judge/*.yaml``; the
rating is the ``[[n]]`` in the reply. Plain ``httpx`` rather than the ``openai`` client: it is already
installed, speaks to any compatible server (OpenAI, vLLM, llama.cpp, Ollama), and keeps the retry policy
explicit and tested here instead of inside a client's own retry loop.

- Timeouts (``timeout_s``), connection errors, HTTP 429/5xx and malformed replies (no JSON, no
  ``[[n]]``, rating outside 1-10) are retried up to ``max_retries`` times with exponential backoff
  (``backoff_s * 2**k``, capped at ``max_backoff_s``; a numeric ``Retry-After`` is honoured up to the cap).
- Other HTTP 4xx (bad key, unknown model) stop the run at once with ``JudgeRequestError``: retrying
  cannot fix them.
- Results are resumable: each judged answer is appended to a JSONL file and flushed at once; a re-run
  skips answers already judged (same question, answer, judge model and prompt) and re-tries the failed.
- The API key comes from the environment variable ``judge.api_key_env`` and is never written anywhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {"tc": "Traditional Chinese (繁體中文)", "sc": "Simplified Chinese", "en": "English"}


class JudgeError(RuntimeError):
    """The judge gave no usable rating for one answer after every retry."""


class JudgeRequestError(JudgeError):
    """The endpoint refused the request itself (HTTP 4xx other than 408/429): stop, do not retry."""


@dataclass(frozen=True)
class Judgment:
    rating: float
    reply: str  # the judge's full text (explanation + rating)
    attempts: int


class Judge:
    """A judge for ``cfg`` (a ``JudgeConfig``-like node); ``sleep`` is injectable for tests."""

    def __init__(self, cfg: Any, *, client: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep):
        if not cfg.base_url:
            raise ValueError("judge.base_url is not set: give the endpoint, e.g. judge.base_url=https://api.openai.com/v1")
        if cfg.timeout_s <= 0 or cfg.max_retries < 0 or cfg.backoff_s < 0:
            raise ValueError(f"judge: timeout_s must be > 0, max_retries and backoff_s >= 0; got {cfg.timeout_s}, "
                             f"{cfg.max_retries}, {cfg.backoff_s}")
        try:
            cfg.prompt_template.format(question="", answer="", expected_language="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"judge.prompt_template: only {{question}}, {{answer}} and {{expected_language}} may be "
                             f"filled in; write literal braces as {{{{ }}}} ({type(err).__name__}: {err})") from None
        self.cfg = cfg
        self.url = str(cfg.base_url).rstrip("/") + "/chat/completions"
        self.pattern = re.compile(cfg.rating_pattern)
        self.sleep = sleep
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        else:  # local servers (vLLM, llama.cpp) usually need none
            log.warning("judge: environment variable %s is not set; calling %s without an API key", cfg.api_key_env, self.url)
        self.client = client or httpx.Client(timeout=httpx.Timeout(cfg.timeout_s), headers=headers)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prompt(self, question: str, answer: str, expected_lang: str) -> str:
        language = LANGUAGE_NAMES.get(expected_lang, expected_lang)
        return self.cfg.prompt_template.format(question=question, answer=answer, expected_language=language)

    def messages(self, question: str, answer: str, expected_lang: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": self.prompt(question, answer, expected_lang)}]

    def parse_rating(self, reply: str) -> float:
        """The last ``[[n]]`` of the reply, which must lie in 1-10; otherwise ``ValueError``."""
        found = self.pattern.findall(reply)
        if not found:
            raise ValueError(f"no rating matching {self.cfg.rating_pattern!r} in the reply: {reply[-200:]!r}")
        rating = float(found[-1])
        if not 1 <= rating <= 10:
            raise ValueError(f"rating {rating} outside 1-10")
        return rating

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        wait = self.cfg.backoff_s * 2**attempt
        if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
            wait = max(wait, float(retry_after))
        return min(wait, self.cfg.max_backoff_s)

    def grade(self, question: str, answer: str, expected_lang: str) -> Judgment:
        """Rate one answer 1-10; retries as the module docstring says, then ``JudgeError``."""
        body = {"model": self.cfg.model, "messages": self.messages(question, answer, expected_lang),
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.cfg.timeout_s}s"
            except httpx.TransportError as err:
                problem = f"connection failed ({type(err).__name__}: {err})"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        reply = response.json()["choices"][0]["message"]["content"]
                        return Judgment(self.parse_rating(reply), reply, attempt + 1)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        problem = f"malformed reply ({type(err).__name__}: {err})"
                elif status in (408, 429) or status >= 500:
                    problem = f"HTTP {status}: {response.text[:200]}"
                    retry_after = response.headers.get("retry-after")
                else:
                    raise JudgeRequestError(f"{self.url} refused the request: HTTP {status}: {response.text[:500]}")
            if attempt < self.cfg.max_retries:
                wait = self._backoff(attempt, retry_after)
                log.warning("judge: %s; retry %d/%d in %.1fs", problem, attempt + 1, self.cfg.max_retries, wait)
                self.sleep(wait)
        raise JudgeError(f"{self.url}: no rating after {self.cfg.max_retries + 1} attempts; last: {problem}")

    def item_key(self, question: str, answer: str, expected_lang: str) -> str:
        """What makes a judgment reusable: the judge model, its prompt and the graded answer."""
        payload = json.dumps([self.cfg.model, self.cfg.system_prompt, self.cfg.prompt_template,
                              question, answer, expected_lang], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def read_judgments(path: Path) -> dict[str, dict]:
    """Judgments already in ``path`` by key; a line cut short by a crash is skipped (and re-judged)."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            done[record["key"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s:%d: unreadable judgment line (interrupted write?); that answer will be judged again", path, lineno)
    return done


def judge_answers(judge: Judge, answers: Iterable[Mapping[str, Any]], results_path: str | Path) -> tuple[list[dict], int]:
    """Judge each ``{"id", "question", "answer", "expected_lang"}`` not yet in ``results_path``.

    Returns ``(judgments for the given answers in their order, number that failed this time)``. Each new
    judgment is appended and flushed at once, so an interrupted run resumes where it stopped.
    """
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_judgments(path)
    results, failed = [], 0
    with path.open("a", encoding="utf-8") as out:
        for item in answers:
            key = judge.item_key(item["question"], item["answer"], item["expected_lang"])
            if key not in done:
                try:
                    judgment = judge.grade(item["question"], item["answer"], item["expected_lang"])
                except JudgeRequestError:
                    raise
                except JudgeError as err:
                    log.warning("judge: item %s: %s", item.get("id"), err)
                    failed += 1
                    continue
                done[key] = {"key": key, "id": item.get("id"), "judge_model": judge.cfg.model,
                             "rating": judgment.rating, "attempts": judgment.attempts, "judgment": judgment.reply}
                out.write(json.dumps(done[key], ensure_ascii=False) + "\n")
                out.flush()
            results.append({**done[key], "id": item.get("id")})
    return results, failed
