"""LLM judge: MT-Bench-style single-answer grading (1-10) through any OpenAI-compatible endpoint.

One ``POST {judge.base_url}/chat/completions`` per answer with the prompt of ``conf/judge/*.yaml``; the
rating is the ``[[n]]`` in the reply. Plain ``httpx`` rather than the ``openai`` client: it is already
installed, speaks to any compatible server (OpenAI, vLLM, llama.cpp, Ollama), and keeps the retry policy
explicit and tested here instead of inside a client's own retry loop.

- ``timeout_s`` bounds each attempt as a whole: connect, send and the complete reply. httpx's own timeouts
  bound each socket operation only (it has no total timeout), so a server trickling a byte at a time could
  hold an attempt indefinitely; ``RequestDeadline`` shuts the attempt's socket down when the time is up.
- Timeouts, connection errors, HTTP 429/5xx and malformed replies (no JSON, no ``[[n]]``, rating outside
  1-10) are retried up to ``max_retries`` times with exponential backoff (``backoff_s * 2**k``, capped at
  ``max_backoff_s``; a numeric ``Retry-After`` is honoured up to the cap).
- Other HTTP 4xx (bad key, unknown model) stop the run at once with ``JudgeRequestError``: retrying
  cannot fix them.
- Results are resumable: each judged answer is appended to a JSONL file and flushed at once; a re-run
  skips answers already judged (same question, answer, judge model and prompt) and re-tries the failed.
- The API key comes from the environment variable named by ``judge.api_key_env`` (a key pasted there
  instead of a name is refused) and is never written anywhere: the key, and the password of a
  ``http://user:KEY@host`` URL, are redacted by value from every log line, error message and stored reply,
  including what the server sends back (a server may echo the Authorization header) and the request lines
  httpx and httpcore log.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from bailong.redact import SecretFilter, check_env_var_name, redact_text

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {"tc": "Traditional Chinese (繁體中文)", "sc": "Simplified Chinese", "en": "English"}
# the loggers of httpx and httpcore: httpx logs each request's full URL at INFO (a URL password included),
# httpcore each response's headers at DEBUG
HTTP_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy", "httpcore.socks")


class JudgeError(RuntimeError):
    """The judge gave no usable rating for one answer after every retry."""


class JudgeRequestError(JudgeError):
    """The endpoint refused the request itself (HTTP 4xx other than 408/429): stop, do not retry."""


@dataclass(frozen=True)
class Judgment:
    rating: float
    reply: str  # the judge's full text (explanation + rating)
    attempts: int


def check_judge_config(cfg: Any) -> None:
    """The settings a ``Judge`` needs, checked before any request (and before a bench generates its answers)."""
    if not cfg.base_url:
        raise ValueError("judge.base_url is not set: give the endpoint, e.g. judge.base_url=https://api.openai.com/v1")
    check_env_var_name("judge.api_key_env", cfg.api_key_env)
    if cfg.timeout_s <= 0 or cfg.max_retries < 0 or cfg.backoff_s < 0:
        raise ValueError(
            f"judge: timeout_s must be > 0, max_retries and backoff_s >= 0; got {cfg.timeout_s}, "
            f"{cfg.max_retries}, {cfg.backoff_s}"
        )
    try:
        cfg.prompt_template.format(question="", answer="", expected_language="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"judge.prompt_template: only {{question}}, {{answer}} and {{expected_language}} may be "
            f"filled in; write literal braces as {{{{ }}}} ({type(err).__name__}: {err})"
        ) from None


def url_credentials(url: str) -> list[str]:
    """The secrets a ``scheme://user:password@host`` URL carries: its password as written and decoded, and the
    Basic credential httpx sends for it (an echoing server returns that, not the password)."""
    parts = urlsplit(url)
    if parts.password is None:
        return []
    user, password = unquote(parts.username or ""), unquote(parts.password)
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return [s for s in dict.fromkeys([parts.password, password, basic]) if s]


class RequestDeadline:
    """A wall-clock limit on one HTTP exchange: connect, send and the complete response.

    A timer shuts the exchange's socket down when ``seconds`` have passed, which ends a blocked read at once.
    The socket comes from httpcore's ``trace`` request extension, reported as the connection is opened; so the
    client must open a connection per request (``max_keepalive_connections=0``), or a reused one goes unseen.
    """

    def __init__(self, seconds: float):
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> RequestDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace callback: keep the socket of the latest stream opened (TCP, then TLS over it)."""
        stream = info.get("return_value") if event.endswith(".complete") else None
        get_extra_info = getattr(stream, "get_extra_info", None)
        sock = get_extra_info("socket") if get_extra_info else None
        if isinstance(sock, socket.socket):
            with self._lock:
                self._socket = sock
                if self.expired:  # connected after the deadline
                    self._shut_down(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._socket is not None:
                self._shut_down(self._socket)

    @staticmethod
    def _shut_down(sock: socket.socket) -> None:
        # the plain socket's shutdown: an SSLSocket's own also drops its TLS state under the reading thread
        with contextlib.suppress(OSError):  # already closed: the exchange is over
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Judge:
    """A judge for ``cfg`` (a ``JudgeConfig``-like node); ``sleep`` is injectable for tests."""

    def __init__(self, cfg: Any, *, sleep: Callable[[float], None] = time.sleep):
        check_judge_config(cfg)
        self.cfg = cfg
        self.url = str(cfg.base_url).rstrip("/") + "/chat/completions"
        self.pattern = re.compile(cfg.rating_pattern)
        self.sleep = sleep
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.secrets = sorted({*url_credentials(self.url), *([key] if key else [])}, key=len, reverse=True)
        self.display_url = self.redact(self.url)  # the URL in every message: no password
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif cfg.api_key_env:  # local servers (vLLM, llama.cpp) usually need none
            log.warning(
                "judge: environment variable %s is not set; calling %s without an API key",
                cfg.api_key_env,
                self.display_url,
            )
        else:
            log.warning("judge: judge.api_key_env is empty; calling %s without an API key", self.display_url)
        # on httpx's and httpcore's loggers while this judge is open: they log the URL and response headers, and
        # a plain CLI (the bench) has no redacting handler filter
        self.http_log_filter = SecretFilter(self.secrets)
        for name in HTTP_LOGGERS:
            logging.getLogger(name).addFilter(self.http_log_filter)
        self.client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout_s), headers=headers, limits=httpx.Limits(max_keepalive_connections=0)
        )  # see RequestDeadline

    def close(self) -> None:
        self.client.close()
        for name in HTTP_LOGGERS:
            logging.getLogger(name).removeFilter(self.http_log_filter)

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def redact(self, text: str) -> str:
        """``text`` without the API key or the URL's credentials (by value) and without any URL password."""
        return redact_text(text, self.secrets)

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

    def _post(self, body: dict) -> httpx.Response:
        """One attempt, ended ``timeout_s`` after it starts whatever the server does (``httpx.TimeoutException``)."""
        with RequestDeadline(self.cfg.timeout_s) as deadline:
            try:
                response = self.client.post(self.url, json=body, extensions={"trace": deadline.trace})
            except httpx.TransportError as err:
                if deadline.expired:  # the shutdown broke the exchange
                    raise httpx.TimeoutException("deadline passed") from err
                raise
        if deadline.expired:  # a body that ends with the connection looks complete when cut short
            raise httpx.TimeoutException("deadline passed")
        return response

    def grade(self, question: str, answer: str, expected_lang: str) -> Judgment:
        """Rate one answer 1-10; retries as the module docstring says, then ``JudgeError``."""
        body = {
            "model": self.cfg.model,
            "messages": self.messages(question, answer, expected_lang),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                response = self._post(body)
            except httpx.TimeoutException:  # httpx's per-operation timeouts, or the deadline
                problem = f"timed out: no complete reply within judge.timeout_s={self.cfg.timeout_s}s"
            except httpx.TransportError as err:
                problem = f"connection failed ({type(err).__name__}: {err})"
            else:
                status = response.status_code
                text = self.redact(response.text)  # whole, before any cut: half a key escapes redaction
                if status == 200:
                    try:
                        reply = self.redact(response.json()["choices"][0]["message"]["content"])
                        return Judgment(self.parse_rating(reply), reply, attempt + 1)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        problem = f"malformed reply ({type(err).__name__}: {err})"
                elif status in (408, 429) or status >= 500:
                    problem = f"HTTP {status}: {text[:200]}"
                    retry_after = response.headers.get("retry-after")
                else:
                    raise JudgeRequestError(
                        self.redact(f"{self.display_url} refused the request: HTTP {status}: {text[:500]}")
                    )
            problem = self.redact(problem)
            if attempt < self.cfg.max_retries:
                wait = self._backoff(attempt, retry_after)
                log.warning("judge: %s; retry %d/%d in %.1fs", problem, attempt + 1, self.cfg.max_retries, wait)
                self.sleep(wait)
        raise JudgeError(f"{self.display_url}: no rating after {self.cfg.max_retries + 1} attempts; last: {problem}")

    def item_key(self, question: str, answer: str, expected_lang: str) -> str:
        """What makes a judgment reusable: the judge model, its prompt and the graded answer."""
        payload = json.dumps(
            [self.cfg.model, self.cfg.system_prompt, self.cfg.prompt_template, question, answer, expected_lang],
            ensure_ascii=False,
        )
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
            log.warning(
                "%s:%d: unreadable judgment line (interrupted write?); that answer will be judged again", path, lineno
            )
    return done


def judge_answers(
    judge: Judge, answers: Iterable[Mapping[str, Any]], results_path: str | Path
) -> tuple[list[dict], int]:
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
                done[key] = {
                    "key": key,
                    "id": item.get("id"),
                    "judge_model": judge.cfg.model,
                    "rating": judgment.rating,
                    "attempts": judgment.attempts,
                    "judgment": judgment.reply,
                }
                out.write(json.dumps(done[key], ensure_ascii=False) + "\n")
                out.flush()
            results.append({**done[key], "id": item.get("id")})
    return results, failed
