"""Generate one assistant reply to a chat: the tokenizer's chat template, then ``model.generate``.

The chat CLI (``bailong.chat``) and the bench runner (``bailong.eval.bench``) both call ``generate``, so a
transcript and a bench answer come from the same code path. Defaults are the sampling settings of the
paper's examples, ``bailong.eval.config.PAPER_SAMPLING``.

A tokenizer without a chat template (a base model, e.g. the mini base before SFT) is formatted with
``PLAIN_CHAT_TEMPLATE``, a documented plain-text layout::

    <s>System: {system}
    User: {user}
    Assistant: {assistant}</s>
    User: {user}
    Assistant:

so "before SFT" numbers can be measured with the very same runner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from bailong.eval.config import PAPER_SAMPLING

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class PromptTooLongError(ValueError):
    """The formatted chat plus ``max_new_tokens`` does not fit the model's positions."""


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """A chat is a non-empty list of ``{"role": system|user|assistant, "content": str}`` ending with a user turn."""
    if isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] = {m!r}: expected {{'role': one of {ROLES}, 'content': str}}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be the user's turn to answer, got role {messages[-1]['role']!r}")


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of the chat formatted for the assistant's next turn.

    The template owns the special tokens (BOS, turn markers), so the text is encoded with
    ``add_special_tokens=False``, as the transformers chat-template docs advise.
    """
    check_messages(messages)
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], chat_template=template, add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 256,
    temperature: float = PAPER_SAMPLING.temperature,
    top_p: float = PAPER_SAMPLING.top_p,
    top_k: int = PAPER_SAMPLING.top_k,
    repetition_penalty: float = PAPER_SAMPLING.repetition_penalty,
    do_sample: bool = True,
    streamer: Any = None,
    seed: int | None = None,
) -> str:
    """The assistant's reply to ``messages`` (the new text only, special tokens removed).

    ``model`` is any causal LM with ``generate`` — a plain transformers model or a peft model on a 4-bit
    base. ``do_sample=False`` decodes greedily (sampling settings ignored). ``seed`` makes sampling
    repeatable without touching the caller's global RNG state. ``streamer`` (e.g.
    ``transformers.TextStreamer(tokenizer, skip_prompt=True)``) receives tokens as they are made.
    Raises ``PromptTooLongError`` when the chat plus ``max_new_tokens`` exceeds the model's positions
    (drop old turns and retry). Runs in eval mode; each module's train/eval flag is restored afterwards.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids = chat_prompt_ids(tokenizer, messages)
    limit = _max_positions(model)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise PromptTooLongError(
            f"the chat is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
            f"{limit} positions: shorten the conversation or lower max_new_tokens"
        )
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        bos_token_id=tokenizer.bos_token_id,
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        rng_devices = [device] if device.type == "cuda" else []  # the RNG that sampling draws from
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                streamer=streamer,
            )
    finally:
        for module, was_training in modes:
            if module.training != was_training:
                module.train(was_training)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
