"""Serving (bailong/serve.py) and the bench against a real server: ``python -m bailong.serve`` starts
``transformers serve`` on the exported smoke run at 127.0.0.1; the bench's answers and the judge's grades go
through it, with the project's own HTTP client (timeouts, retries, malformed replies) against a real server.

The judge is the served mini model itself, so it never writes a ``[[rating]]``: every judgment is a malformed
reply, retried and then counted in ``bench/judge_failed`` — which is what this exercises. A judge deadline
shorter than the server can answer exercises the timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.eval.config import PAPER_SAMPLING
from bailong.eval.generate import generate
from bailong.serve import main as serve_main
from conftest import ROOT, free_port, running_server

pytestmark = [
    pytest.mark.slow,  # a smoke pre-training run (shared with tests/test_gguf.py) and a server
    pytest.mark.skipif(
        find_spec("fastapi") is None or find_spec("uvicorn") is None,
        reason="the serve extra: pip install -e '.[serve]' (transformers serve)",
    ),
]


@pytest.fixture(scope="module")
def server(smoke_export, tmp_path_factory):
    """``(base_url, export dir)`` of ``python -m bailong.serve <export>``, up until the module's tests end."""
    _, export_dir = smoke_export
    port = free_port()
    command = [sys.executable, "-m", "bailong.serve", str(export_dir), "--port", str(port), "--device", "cpu"]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(command, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}/v1", export_dir


def chat(server, messages: list[dict], max_tokens: int = 24) -> str:
    """The server's greedy reply; transformers serve answers to the served directory's path only."""
    base_url, export_dir = server
    body = {"model": str(export_dir), "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_served_answer_is_the_models_own_greedy_answer(server):
    """Same chat template, same weights, same decoding: the server answers what bailong's generate does
    (greedy with the export's generation config, whose repetition penalty is the paper's)."""
    _, export_dir = server
    model, tok = AutoModelForCausalLM.from_pretrained(export_dir).eval(), AutoTokenizer.from_pretrained(export_dir)
    for messages in (
        [{"role": "user", "content": "請用一句話介紹台北。"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a night market?"}],
    ):
        expected = generate(
            model,
            tok,
            messages,
            max_new_tokens=24,
            do_sample=False,
            repetition_penalty=PAPER_SAMPLING.repetition_penalty,
        )
        assert chat(server, messages).strip() == expected.strip()


def run_bench(server, out, prompts, *overrides: str) -> tuple[dict, str]:
    base_url, export_dir = server
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bailong.eval",
            "bench",
            "--model-url",
            base_url,
            "--model-name",
            str(export_dir),
            "--judge-url",
            base_url,
            "--judge-model",
            str(export_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "bench.max_new_tokens=12",
            "judge.max_tokens=8",
            "judge.max_retries=1",
            "judge.backoff_s=0",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Two single-turn prompts and two two-turn conversations of the shipped bench (TC and EN)."""
    lines = (ROOT / "data" / "bench" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    chosen = [r for r in records if "prompt" in r][:2] + [r for r in records if "turns" in r][:2]
    assert len(chosen) == 4 and sum("turns" in r for r in chosen) == 2
    path = tmp_path_factory.mktemp("bench_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return path, chosen


def test_bench_end_to_end_through_the_server_with_a_served_judge(server, prompts, tmp_path):
    path, chosen = prompts
    metrics, log = run_bench(server, tmp_path, path)
    rows = [json.loads(line) for line in (tmp_path / "bench" / "generations.jsonl").read_text().splitlines()]
    items = sum(len(r.get("turns", [None])) for r in chosen)
    assert len(rows) == items == metrics["bench/n"] == 6
    # each answer is the server's own; turn 2 was asked with turn 1's question and the server's answer before it
    conversation = next(r for r in chosen if "turns" in r)
    first, second = (r for r in rows if r["id"] == conversation["id"])
    messages = [{"role": "user", "content": conversation["turns"][0]}]
    assert first["answer"] == chat(server, messages, max_tokens=12).strip()
    messages.append({"role": "assistant", "content": first["answer"]})
    messages.append({"role": "user", "content": conversation["turns"][1]})
    assert second["answer"] == chat(server, messages, max_tokens=12).strip()
    # the served mini model never writes "[[n]]": every item is judged, retried once, then counted as failed
    assert metrics["bench/judge_failed"] == items and metrics["bench/judge_n"] == 0
    assert log.count("malformed reply") >= 2 * items and "retry 1/1" in log
    assert "bench/turn2/lang_consistency" in metrics and "bench/lang_consistency" in metrics


def test_a_judge_deadline_shorter_than_the_server_times_out(server, prompts, tmp_path):
    path, _ = prompts
    metrics, log = run_bench(
        server, tmp_path, path, "judge.timeout_s=0.001", "judge.max_tokens=64", "bench.max_prompts=1"
    )
    assert metrics["bench/judge_failed"] == metrics["bench/n"] == 1
    assert "timed out: no complete reply within judge.timeout_s=0.001s" in log


def test_serve_targets_and_errors(smoke_export, tmp_path, capsys):
    run, export_dir = smoke_export
    assert serve_main([str(export_dir), "--port", "9", "--dry-run"]) == 0
    command = capsys.readouterr().out
    assert "transformers.cli.transformers serve" in command and str(export_dir) in command and "127.0.0.1" in command
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    serve_main([str(gguf), "--dry-run", "--model-name", "x"])
    assert "llama_cpp.server --model" in capsys.readouterr().out
    with pytest.raises(ValueError, match="answers to the directory's path only"):
        serve_main([str(export_dir), "--dry-run", "--model-name", "x"])
    with pytest.raises(FileNotFoundError, match="not a model, export or run directory"):
        serve_main([str(tmp_path), "--dry-run"])
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        serve_main([str(tmp_path / "none.gguf"), "--dry-run"])
    # a run is exported once for serving, then reused while its adapter is unchanged
    serve_main([str(run), "--export-dir", str(tmp_path / "e"), "--dry-run"])
    first = (tmp_path / "e" / "model.safetensors").stat().st_mtime_ns
    serve_main([str(run), "--export-dir", str(tmp_path / "e"), "--dry-run"])
    assert (tmp_path / "e" / "model.safetensors").stat().st_mtime_ns == first
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an export made by bailong.serve"):
        serve_main([str(run), "--export-dir", str(tmp_path / "taken"), "--dry-run"])
