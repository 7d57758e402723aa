"""Chat data for SFT: read and validate conversations, render them with the chat template, mask the
labels to the assistant's turns, and pack whole conversations into fixed-length rows.

A conversation is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``:
an optional system message first, then user and assistant turns alternating, starting with the user,
with at least one assistant turn. Files are JSON Lines (optionally .gz); hub data sets in the same
messages format load through ``datasets.load_dataset``. Every error names the file and line (or the
hub record) and what was expected.

The chat template renders exactly the plain layout that ``bailong.eval.generate`` uses for a model
without a template (so "before SFT" and "after SFT" are scored on the same prompts)::

    <s>System: {system}
    User: {user}
    Assistant: {assistant}</s>
    User: ...

Each assistant reply (with its leading space and its ``</s>``) sits in a ``{% generation %}`` block,
so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens the loss
sees: the model learns to answer and to stop, never to predict the user's words.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bailong.data.config import ChatCorpusConfig, expect_config
from bailong.data.corpus import read_jsonl, write_jsonl
from bailong.data.windows import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant:{% generation %} {{ m['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


class ChatDataError(ValueError):
    """Bad chat data: the message names the file and line (or hub record) and what was expected."""


# -- validation ------------------------------------------------------------------------------------
def check_conversation(messages: Any, where: str) -> Conversation:
    """The conversation as plain ``{"role", "content"}`` dicts, or a ``ChatDataError`` naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}")
    out: Conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatDataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatDataError(f"{where}: messages[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ChatDataError(f"{where}: messages[{i}] ({role}) needs a non-empty string 'content'")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + len(out) - len(turns)
            raise ChatDataError(
                f"{where}: messages[{index}] is {m['role']!r} but {expected!r} was expected: after an optional "
                "system message, user and assistant turns alternate, starting with the user"
            )
    if not any(m["role"] == "assistant" for m in out):
        raise ChatDataError(f"{where}: no assistant turn: nothing to learn from")
    return out


# -- reading ---------------------------------------------------------------------------------------
def _jsonl_conversations(path: Path, messages_field: str) -> Iterator[Conversation]:
    for where, record in read_jsonl(path, error=ChatDataError):
        if messages_field not in record:
            found = ", ".join(sorted(record)) or "no keys"
            raise ChatDataError(f"{where}: expected an object with a {messages_field!r} list (found: {found})")
        yield check_conversation(record[messages_field], where)


def _hub_conversations(spec: ChatCorpusConfig) -> Iterator[Conversation]:
    import datasets  # only hub chat sets need it

    path, field = spec.path, spec.messages_field
    ds = datasets.load_dataset(
        path,
        spec.name,
        split=spec.split,
        data_files=spec.data_files,
        revision=spec.revision,
        streaming=spec.streaming,
    )
    for i, record in enumerate(ds):
        if field not in record:
            raise ChatDataError(
                f"hub data set {path!r} record {i}: no {field!r} field (found: {', '.join(sorted(record))})"
            )
        yield check_conversation(record[field], f"hub data set {path!r} record {i}")


def load_conversations(spec: ChatCorpusConfig) -> list[Conversation]:
    """Conversations of one chat corpus, at most its ``max_records``."""
    expect_config(spec, ChatCorpusConfig, "load_conversations(spec)")
    path, fmt = str(spec.path), spec.format
    if fmt is None:
        fmt = "jsonl" if path.endswith((".jsonl", ".jsonl.gz", ".json")) else None
    if fmt == "hub":
        records = _hub_conversations(spec)
    elif fmt == "jsonl":
        if not Path(path).is_file():
            raise ChatDataError(f"{path}: chat file not found")
        records = _jsonl_conversations(Path(path), spec.messages_field)
    else:
        raise ChatDataError(f"{path}: chat data format {fmt!r}: expected jsonl (.jsonl, .jsonl.gz) or hub")
    limit = spec.max_records
    out = []
    for conv in records:
        if limit is not None and len(out) >= limit:
            break
        out.append(conv)
    if not out:
        raise ChatDataError(f"{path}: no conversations")
    return out


def write_conversations(conversations: Sequence[Conversation], path: str | Path) -> Path:
    return write_jsonl(({"messages": conv} for conv in conversations), path)


# -- template and labels ---------------------------------------------------------------------------
def set_chat_template(tokenizer: Any) -> Any:
    """Give the tokenizer bailong's chat template (saved with it by ``save_pretrained``)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the assistant's replies
    answer_chars: int  # characters of the assistant's replies: the denominator of answer bits/char
    answer_bytes: int  # their UTF-8 bytes (bits per byte)


def encode_conversation(tokenizer: Any, messages: Conversation) -> EncodedChat:
    """Token ids of the rendered conversation and labels equal to them on assistant tokens only."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: call set_chat_template(tokenizer) first")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return EncodedChat(ids, labels, sum(map(len, answers)), sum(len(a.encode("utf-8")) for a in answers))


# -- packing ---------------------------------------------------------------------------------------
def pack_conversations(
    chats: Sequence[EncodedChat], seq_len: int, pad_id: int, *, packing: bool = True
) -> dict[str, torch.Tensor]:
    """Whole conversations packed into rows of ``seq_len`` tokens (first-fit decreasing; one per row,
    in order, when ``packing`` is off).

    Returns ``input_ids``, ``labels`` and ``position_ids`` ``[rows, seq_len]``. Positions restart at 0
    for every conversation and for the padding at a row's end; with ``attention_mask=None`` and ``use_cache=False``
    transformers reads those restarts as packed sequences and builds a block-diagonal causal mask, so a
    conversation never attends to its neighbours (a test checks the logits equal those of the
    conversation alone). A conversation longer than ``seq_len`` is cut to its first ``seq_len`` tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    items = [(c.input_ids[:seq_len], c.labels[:seq_len]) for c in chats]
    cut = sum(len(c.input_ids) > seq_len for c in chats)
    if cut:
        log.warning("%d of %d conversations are longer than seq_len=%d and were truncated", cut, len(chats), seq_len)
    items = [it for it in items if any(label != IGNORE_INDEX for label in it[1][1:])]
    if not items:
        raise ValueError("no conversation has an assistant token within seq_len: nothing to train on")
    rows: list[list[int]] = []  # indices of items per row
    space: list[int] = []
    for i in sorted(range(len(items)), key=lambda k: -len(items[k][0])) if packing else range(len(items)):
        n = len(items[i][0])
        row = next((r for r, free in enumerate(space) if free >= n), None) if packing else None
        if row is None:
            rows.append([])
            space.append(seq_len)
            row = len(rows) - 1
        rows[row].append(i)
        space[row] -= n
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            ids, labs = items[i]
            input_ids[r, pos : pos + len(ids)] = torch.tensor(ids)
            labels[r, pos : pos + len(ids)] = torch.tensor(labs)
            position_ids[r, pos : pos + len(ids)] = torch.arange(len(ids))
            pos += len(ids)
        position_ids[r, pos:] = torch.arange(seq_len - pos)  # padding: a sequence of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_chats(chats: Sequence[EncodedChat], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpacked, right-padded batch for scoring: ``input_ids``, ``attention_mask``, ``labels``, ``chars``, ``bytes``."""
    length = max(len(c.input_ids) for c in chats)
    input_ids = torch.full((len(chats), length), pad_id, dtype=torch.long)
    labels = torch.full((len(chats), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(chats), length), dtype=torch.long)
    for r, c in enumerate(chats):
        n = len(c.input_ids)
        input_ids[r, :n] = torch.tensor(c.input_ids)
        labels[r, :n] = torch.tensor(c.labels)
        attention_mask[r, :n] = 1
    chars = torch.tensor([c.answer_chars for c in chats], dtype=torch.long)
    n_bytes = torch.tensor([c.answer_bytes for c in chats], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "chars": chars,
        "bytes": n_bytes,
    }
