"""python -m bailong.chat: scripted multi-turn JSON, the paper's sampling defaults, interactive streaming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from bailong.chat import load_chat_model, reply, run_prompts
from bailong.data.chat import set_chat_template
from bailong.eval.config import PAPER_SAMPLING
from bailong.eval.generate import PromptTooLongError, generate
from conftest import ROOT
from test_build import make_tiny_base
from test_export import saved_adapter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tiny = make_tiny_base(tmp_path_factory.mktemp("tiny"))
    set_chat_template(tiny.tokenizer)
    return saved_adapter(tiny, tmp_path_factory.mktemp("run"))


def chat_cli(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bailong.chat", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_scripted_two_turn_chat_prints_json(run_dir):
    args = [str(run_dir), "--prompt", "Hello", "--prompt", "And then?", "--max-new-tokens", "6", "--seed", "0"]
    proc = chat_cli(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [t["user"] for t in out["turns"]] == ["Hello", "And then?"]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in out["messages"][1::2]] == [t["assistant"] for t in out["turns"]]
    s = out["settings"]
    assert (s["temperature"], s["top_p"], s["top_k"], s["repetition_penalty"]) == (0.6, 0.9, 40, 1.1)
    assert s["do_sample"] is True and s["seed"] == 0
    # the same seed gives the same transcript; the second turn saw the first (multi-turn context)
    model, tok = load_chat_model(run_dir)
    settings = {
        k: s[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "seed")
    }
    again = run_prompts(model, tok, ["Hello", "And then?"], settings)
    assert again["turns"] == out["turns"]
    second = generate(model, tok, out["messages"][:3], **settings)
    assert second == out["turns"][1]["assistant"]


def test_interactive_mode_streams_and_takes_commands(run_dir):
    proc = chat_cli(
        [str(run_dir), "--max-new-tokens", "4", "--greedy"], stdin="Hi\n/reset\n/system Be brief.\nHi\n/exit\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 2
    assert "/reset" in proc.stderr  # the banner lists the commands


def test_old_turns_are_dropped_when_the_chat_outgrows_the_positions(run_dir):
    model, tok = load_chat_model(run_dir)  # the tiny model has 128 positions
    settings = {"max_new_tokens": 8, "do_sample": False}
    long = "word " * 40
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "Hi"},
    ]
    with pytest.raises(PromptTooLongError):
        generate(model, tok, messages, **settings)
    assert reply(model, tok, messages, settings) == generate(model, tok, [messages[0], messages[3]], **settings)
    with pytest.raises(PromptTooLongError):  # one turn alone too long: nothing left to drop
        reply(model, tok, [{"role": "user", "content": "word " * 200}], settings)


def test_defaults_are_the_papers_and_bad_options_fail(run_dir):
    assert asdict(PAPER_SAMPLING) == {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    from bailong.chat import main

    with pytest.raises(SystemExit):
        main([str(run_dir), "--temperature", "0", "--prompt", "x"])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_chat_model(run_dir / "nowhere")
