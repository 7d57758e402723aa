"""One client for OpenAI-compatible chat-completions endpoints: the LLM judge (``bailong.eval.judge``) and a
served model answering the bench (``bailong.eval.bench``, a model behind ``transformers serve``, llama.cpp's
server or vLLM) share it, so the request, retry and redaction policy below exists once.

One ``POST {base_url}/chat/completions`` per reply. Plain ``httpx`` rather than the ``openai`` client: it is
already installed, speaks to any compatible server, and keeps the retry policy explicit and tested here instead
of inside a client's own retry loop.

- ``timeout_s`` bounds each attempt as a whole: connect, send and the complete reply. httpx's own timeouts
  bound each socket operation only (it has no total timeout), so a server trickling a byte at a time could
  hold an attempt indefinitely; ``RequestDeadline`` shuts the attempt's socket down when the time is up.
- Timeouts, connection errors, HTTP 408/429/5xx and malformed replies are retried up to ``max_retries`` times
  with exponential backoff (``backoff_s * 2**k``, capped at ``max_backoff_s``; a numeric ``Retry-After`` is
  honoured up to the cap). A reply is malformed when it is not the chat-completions JSON, its content is not a
  string, or the caller's validator refuses the content (the judge's: no ``[[n]]`` rating in 1-10).
- Other HTTP 4xx (bad key, unknown model) stop at once with ``ChatRequestError``: retrying cannot fix them.
- The API key comes from the environment variable named by ``api_key_env`` (a key pasted there instead of a
  name is refused) and is never written anywhere: the key, and the password of a ``http://user:KEY@host``
  URL, are redacted by value from every log line, error message and returned reply, including what the server
  sends back (a server may echo the Authorization header) and the request lines httpx and httpcore log.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from bailong.redact import SecretFilter, check_env_var_name, redact_text

log = logging.getLogger(__name__)

# the loggers of httpx and httpcore: httpx logs each request's full URL at INFO (a URL password included),
# httpcore each response's headers at DEBUG
HTTP_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy", "httpcore.socks")

T = TypeVar("T")


class ChatError(RuntimeError):
    """The endpoint gave no usable reply after every retry."""


class ChatRequestError(ChatError):
    """The endpoint refused the request itself (HTTP 4xx other than 408/429): stop, do not retry."""


@dataclass(frozen=True)
class ChatReply(Generic[T]):
    value: T  # what the validator made of the content
    text: str  # the reply's content, redacted
    attempts: int


def check_endpoint(cfg: Any, key: str) -> None:
    """The endpoint settings of ``cfg`` (an ``EndpointConfig``-like node under the config key ``key``), checked
    before any request: a plain OmegaConf node has not been through the dataclass's own checks."""
    if not cfg.base_url:
        raise ValueError(f"{key}.base_url is not set: give the endpoint, e.g. {key}.base_url=http://127.0.0.1:8000/v1")
    check_env_var_name(f"{key}.api_key_env", cfg.api_key_env)
    if cfg.timeout_s <= 0 or cfg.max_retries < 0 or cfg.backoff_s < 0:
        raise ValueError(
            f"{key}: timeout_s must be > 0, max_retries and backoff_s >= 0; got {cfg.timeout_s}, "
            f"{cfg.max_retries}, {cfg.backoff_s}"
        )


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


class ChatClient:
    """A client for the endpoint ``cfg`` (``EndpointConfig``-like: ``base_url``, ``model``, ``api_key_env``,
    ``timeout_s``, ``max_retries``, ``backoff_s``, ``max_backoff_s``) whose settings live under the config key
    ``key`` (``judge``, ``bench.server``: messages name it). ``sleep`` is injectable for tests."""

    def __init__(self, cfg: Any, key: str, *, sleep: Callable[[float], None] = time.sleep):
        check_endpoint(cfg, key)
        self.cfg, self.key, self.sleep = cfg, key, sleep
        self.url = str(cfg.base_url).rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.secrets = sorted({*url_credentials(self.url), *([api_key] if api_key else [])}, key=len, reverse=True)
        self.display_url = self.redact(self.url)  # the URL in every message: no password
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif cfg.api_key_env:  # asked for a key that is not there; local servers usually need none
            log.warning(
                "%s: environment variable %s is not set; calling %s without an API key",
                key,
                cfg.api_key_env,
                self.display_url,
            )
        else:
            log.info("%s: %s.api_key_env is empty; calling %s without an API key", key, key, self.display_url)
        # on httpx's and httpcore's loggers while this client is open: they log the URL and response headers, and
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

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def redact(self, text: str) -> str:
        """``text`` without the API key or the URL's credentials (by value) and without any URL password."""
        return redact_text(text, self.secrets)

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

    def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        validate: Callable[[str], T],
        *,
        what: str = "reply",
        **params: Any,
    ) -> ChatReply[T]:
        """The endpoint's reply to ``messages`` (``params``: ``max_tokens``, ``temperature``, ... of the request
        body), through ``validate`` (``ValueError``: malformed, retried); retries as the module docstring says,
        then ``ChatError`` naming ``what`` was wanted."""
        body = {"model": self.cfg.model, "messages": [dict(m) for m in messages], **params}
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                response = self._post(body)
            except httpx.TimeoutException:  # httpx's per-operation timeouts, or the deadline
                problem = f"timed out: no complete reply within {self.key}.timeout_s={self.cfg.timeout_s}s"
            except httpx.TransportError as err:
                problem = f"connection failed ({type(err).__name__}: {err})"
            else:
                status = response.status_code
                text = self.redact(response.text)  # whole, before any cut: half a key escapes redaction
                if status == 200:
                    try:
                        content = response.json()["choices"][0]["message"]["content"]
                        if not isinstance(content, str):
                            raise TypeError(f"the message content is {type(content).__name__}, not a string")
                        reply = self.redact(content)
                        return ChatReply(validate(reply), reply, attempt + 1)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        problem = f"malformed reply ({type(err).__name__}: {err})"
                elif status in (408, 429) or status >= 500:
                    problem = f"HTTP {status}: {text[:200]}"
                    retry_after = response.headers.get("retry-after")
                else:
                    raise ChatRequestError(
                        self.redact(f"{self.display_url} refused the request: HTTP {status}: {text[:500]}")
                    )
            problem = self.redact(problem)
            if attempt < self.cfg.max_retries:
                wait = self._backoff(attempt, retry_after)
                log.warning("%s: %s; retry %d/%d in %.1fs", self.key, problem, attempt + 1, self.cfg.max_retries, wait)
                self.sleep(wait)
        raise ChatError(f"{self.display_url}: no {what} after {self.cfg.max_retries + 1} attempts; last: {problem}")
