"""LLM judge: MT-Bench-style single-answer grading (1-10) through any OpenAI-compatible endpoint.

One ``POST {judge.base_url}/chat/completions`` per scored answer, through ``bailong.eval.chat_client.ChatClient``
(per-attempt deadline, retries with backoff, the key from ``judge.api_key_env``, redaction: see that module);
the rating is the last ``[[n]]`` of the reply, and a reply without one in 1-10 is malformed, so retried.

- The first turn of a conversation is graded with ``judge.prompt_template`` (FastChat's MT-Bench "single-v1"),
  a later turn with ``judge.multi_turn_template`` ("single-v1-multi-turn"): the judge sees the conversation so
  far and rates the answer to the last user question only.
- Results are resumable: each judged answer is appended to a JSONL file and flushed at once; a re-run
  skips answers already judged (same judge model and prompt, conversation, question and answer) and re-tries
  the failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bailong.eval.chat_client import ChatClient, ChatError, ChatRequestError, check_endpoint

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {"tc": "Traditional Chinese (繁體中文)", "sc": "Simplified Chinese", "en": "English"}
TEMPLATE_FIELDS = {
    "prompt_template": ("question", "answer", "expected_language"),
    "multi_turn_template": ("conversation", "question", "answer", "expected_language"),
}
Context = Sequence[Sequence[str]]  # the earlier turns of a conversation: (user question, assistant answer) pairs


@dataclass(frozen=True)
class Judgment:
    rating: float
    reply: str  # the judge's full text (explanation + rating)
    attempts: int


def check_judge_config(cfg: Any) -> None:
    """The settings a ``Judge`` needs, checked before any request (and before a bench generates its answers)."""
    check_endpoint(cfg, "judge")
    for name, fields in TEMPLATE_FIELDS.items():
        try:
            getattr(cfg, name).format(**dict.fromkeys(fields, ""))
        except (KeyError, IndexError, ValueError) as err:
            allowed = ", ".join(f"{{{f}}}" for f in fields)
            raise ValueError(
                f"judge.{name}: only {allowed} may be filled in; write literal braces as {{{{ }}}} "
                f"({type(err).__name__}: {err})"
            ) from None


def render_conversation(context: Context) -> str:
    """The earlier turns as the multi-turn template shows them, FastChat's ``### User:`` / ``### Assistant:``."""
    return "\n\n".join(f"### User:\n{question}\n\n### Assistant:\n{answer}" for question, answer in context)


class Judge(ChatClient):
    """A judge for ``cfg`` (a ``JudgeConfig``-like node); ``sleep`` is injectable for tests."""

    def __init__(self, cfg: Any, *, sleep: Callable[[float], None] = time.sleep):
        check_judge_config(cfg)
        super().__init__(cfg, "judge", sleep=sleep)
        self.pattern = re.compile(cfg.rating_pattern)

    def prompt(self, question: str, answer: str, expected_lang: str, context: Context = ()) -> str:
        """The single-answer prompt for a first turn; with earlier turns, the multi-turn one showing them."""
        language = LANGUAGE_NAMES.get(expected_lang, expected_lang)
        if not context:
            return self.cfg.prompt_template.format(question=question, answer=answer, expected_language=language)
        return self.cfg.multi_turn_template.format(
            conversation=render_conversation(context), question=question, answer=answer, expected_language=language
        )

    def messages(self, question: str, answer: str, expected_lang: str, context: Context = ()) -> list[dict]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": self.prompt(question, answer, expected_lang, context)}]

    def parse_rating(self, reply: str) -> float:
        """The last ``[[n]]`` of the reply, which must lie in 1-10; otherwise ``ValueError``."""
        found = self.pattern.findall(reply)
        if not found:
            raise ValueError(f"no rating matching {self.cfg.rating_pattern!r} in the reply: {reply[-200:]!r}")
        rating = float(found[-1])
        if not 1 <= rating <= 10:
            raise ValueError(f"rating {rating} outside 1-10")
        return rating

    def grade(self, question: str, answer: str, expected_lang: str, context: Context = ()) -> Judgment:
        """Rate the answer to ``question`` (after the earlier turns ``context``) 1-10; retries as
        ``bailong.eval.chat_client`` says, then ``ChatError``."""
        reply = self.complete(
            self.messages(question, answer, expected_lang, context),
            self.parse_rating,
            what="rating",
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )
        return Judgment(reply.value, reply.text, reply.attempts)

    def item_key(self, question: str, answer: str, expected_lang: str, context: Context = ()) -> str:
        """What makes a judgment reusable: the judge model, its prompt and the graded answer in its conversation
        (the same answer after different earlier turns is another item). A first turn's key is what it was before
        conversations were judged, so an earlier run's judgments file still resumes."""
        fields = [self.cfg.model, self.cfg.system_prompt, self.cfg.prompt_template, question, answer, expected_lang]
        if context:
            fields[2] = self.cfg.multi_turn_template
            fields.append([list(turn) for turn in context])
        payload = json.dumps(fields, ensure_ascii=False)
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
    """Judge each ``{"id", "question", "answer", "expected_lang", "context"?, "turn"?}`` not yet in
    ``results_path`` (``context``: the earlier turns, ``(question, answer)`` pairs; ``turn``: 1 when absent).

    Returns ``(judgments for the given answers in their order, number that failed this time)``. Each new
    judgment is appended and flushed at once, so an interrupted run resumes where it stopped.
    """
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_judgments(path)
    results, failed = [], 0
    with path.open("a", encoding="utf-8") as out:
        for item in answers:
            args = (item["question"], item["answer"], item["expected_lang"], item.get("context", ()))
            key = judge.item_key(*args)
            if key not in done:
                try:
                    judgment = judge.grade(*args)
                except ChatRequestError:
                    raise
                except ChatError as err:
                    log.warning("judge: item %s turn %s: %s", item.get("id"), item.get("turn", 1), err)
                    failed += 1
                    continue
                done[key] = {
                    "key": key,
                    "id": item.get("id"),
                    "turn": item.get("turn", 1),
                    "judge_model": judge.cfg.model,
                    "rating": judgment.rating,
                    "attempts": judgment.attempts,
                    "judgment": judgment.reply,
                }
                out.write(json.dumps(done[key], ensure_ascii=False) + "\n")
                out.flush()
            results.append({**done[key], "id": item.get("id"), "turn": item.get("turn", 1)})
    return results, failed
