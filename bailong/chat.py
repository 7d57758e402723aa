"""Chat with a trained model in the terminal, or script a conversation and get JSON back.

    python -m bailong.chat outputs/sft/runs/<run>                       # interactive, streamed
    python -m bailong.chat outputs/sft/runs/<run> --prompt "請接下一句：「床前明月光」" --prompt "作者是誰？"

``<run>`` is a run directory (its ``adapter/`` reloads onto a fresh base), an ``adapter/`` directory, or
a merged model written by ``python -m bailong.export``. Sampling defaults are the paper's examples
(``bailong.eval.config.PAPER_SAMPLING``; ``--greedy`` decodes greedily).
Replies come from ``bailong.eval.generate.generate``, the same code path the bench uses.

Interactive commands: ``/reset`` forgets the conversation, ``/system TEXT`` sets a system message,
``/exit`` (or Ctrl-D) quits. With ``--prompt`` (repeatable: one user turn each) the whole conversation
is printed as JSON: ``{"model", "settings", "messages", "turns": [{"user", "assistant"}]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bailong.eval.config import PAPER_SAMPLING
from bailong.eval.generate import PromptTooLongError, generate
from bailong.model.loading import DEVICE_CHOICES, DEVICE_HELP, TRUST_REMOTE_CODE_HELP, load_for_inference


def load_chat_model(path: str | Path, device: str = "auto", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a run directory, an adapter directory or a merged (exported) model directory,
    on ``device`` (``auto``: this process's GPU when there is one, else the CPU); a model's own code runs only
    if ``trust_remote_code`` (the user's flag). A model directory loads unquantised in the dtype it was saved
    in, with its own tokenizer (an export's carries the chat template)."""
    from bailong.model.adapter import META_FILE, find_adapter

    path = Path(path)
    if find_adapter(path) is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a run directory (no adapter/{META_FILE}), an adapter directory "
            "or a model directory (no config.json)"
        )
    _, model, tokenizer = load_for_inference(
        path, quant="none", device=device, trust_remote_code=trust_remote_code, dtype="auto", own_tokenizer=True
    )
    return model, tokenizer


def reply(model: Any, tokenizer: Any, messages: list[dict], settings: dict, streamer: Any = None) -> str:
    """The assistant's answer; when the chat outgrows the model's positions the oldest turns are dropped."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        try:
            return generate(model, tokenizer, system + turns, streamer=streamer, **settings)
        except PromptTooLongError:
            if len(turns) <= 1:
                raise
            turns = turns[2:]  # forget the oldest user/assistant exchange
            print("[the conversation was too long: the oldest exchange is dropped]", file=sys.stderr)


def run_prompts(model: Any, tokenizer: Any, prompts: list[str], settings: dict, system: str | None = None) -> dict:
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    turns = []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        answer = reply(model, tokenizer, messages, settings)
        messages.append({"role": "assistant", "content": answer})
        turns.append({"user": prompt, "assistant": answer})
    return {"messages": messages, "turns": turns}


def interactive(model: Any, tokenizer: Any, settings: dict, system: str | None = None) -> None:
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print("bailong chat — /reset, /system TEXT, /exit", file=sys.stderr)
    while True:
        try:
            line = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            continue
        if line.startswith("/system"):
            text = line[len("/system") :].strip()
            messages = ([{"role": "system", "content": text}] if text else []) + [
                m for m in messages if m["role"] != "system"
            ]
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        answer = reply(model, tokenizer, messages, settings, streamer=streamer)
        messages.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bailong.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory, adapter directory or exported model directory")
    parser.add_argument("--prompt", action="append", default=[], help="a user turn (repeat for more); prints JSON")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--temperature", type=float, default=PAPER_SAMPLING.temperature)
    parser.add_argument("--top-p", type=float, default=PAPER_SAMPLING.top_p)
    parser.add_argument("--top-k", type=int, default=PAPER_SAMPLING.top_k)
    parser.add_argument("--repetition-penalty", type=float, default=PAPER_SAMPLING.repetition_penalty)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=None, help="makes sampled replies repeatable")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    args = parser.parse_args(argv)
    for name in ("temperature", "top_p"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.top_k < 0 or args.repetition_penalty <= 0 or args.max_new_tokens < 1:
        parser.error("--top-k must be >= 0, --repetition-penalty > 0, --max-new-tokens >= 1")

    model, tokenizer = load_chat_model(args.model, args.device, args.trust_remote_code)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "do_sample": not args.greedy,
        "seed": args.seed,
    }
    if args.prompt:
        result = run_prompts(model, tokenizer, args.prompt, settings, system=args.system)
        print(json.dumps({"model": str(args.model), "settings": settings, **result}, ensure_ascii=False, indent=2))
    else:
        interactive(model, tokenizer, settings, system=args.system)


if __name__ == "__main__":
    main()
