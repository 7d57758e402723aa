"""The hash-keyed caches that let sweep jobs share tokenizers, base metrics and init rows, and
``python -m bailong.cache {list,prune}`` on real cache directories (writers killed with SIGKILL, locks
held by live processes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bailong.cache import (
    atomic_dir,
    cache_key,
    cached_json,
    computed_once,
    default_cache_dir,
    fingerprint,
    hash_texts,
    lock_path,
)
from conftest import ROOT, compose_config

DAY = 86400


def test_cached_json_computes_once_per_input(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"bpc": 1.5}

    assert cached_json(tmp_path, {"a": 1}, compute) == {"bpc": 1.5}
    assert cached_json(tmp_path, {"a": 1}, compute) == {"bpc": 1.5}
    assert len(calls) == 1
    cached_json(tmp_path, {"a": 2}, compute)
    assert len(calls) == 2


def test_keys_follow_content():
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
    assert hash_texts(["ab", "c"]) != hash_texts(["a", "bc"])  # documents are delimited


def test_fingerprint_changes_when_weights_change(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"123456")
    assert fingerprint(str(tmp_path)) != before
    assert fingerprint("meta-llama/Llama-2-7b-hf") == ["meta-llama/Llama-2-7b-hf"]


def visible(directory: Path) -> list[str]:
    """Names a listing of results shows: not the `.locks` folder."""
    return sorted(p.name for p in directory.iterdir() if p.name != ".locks")


def test_atomic_dir_all_or_nothing(tmp_path):
    target = tmp_path / "rows"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash mid-write")
    assert not target.exists() and visible(tmp_path) == []
    with atomic_dir(target) as tmp:
        (tmp / "rows.safetensors").write_text("ok")
    with atomic_dir(target) as tmp:  # a second job finishing later leaves the first result in place
        (tmp / "rows.safetensors").write_text("late")
    assert (target / "rows.safetensors").read_text() == "ok"
    assert visible(tmp_path) == ["rows"]


def test_computed_once_records_the_entrys_last_use(tmp_path):
    entry = tmp_path / "init_rows" / "k1"
    with computed_once(entry):
        pass
    lock = lock_path(entry)
    os.utime(lock, (time.time() - 10 * DAY,) * 2)
    with computed_once(entry):  # a reader: the entry was used now
        pass
    assert time.time() - lock.stat().st_mtime < 60


# ------------------------------------------------------------------------------------------------
# python -m bailong.cache


def cli(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BAILONG_CACHE"}
    if env_cache is not None:
        env["BAILONG_CACHE"] = str(env_cache)
    return subprocess.run(
        [sys.executable, "-m", "bailong.cache", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def cli_json(*args: str) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write_rows_entry(cache: Path, key: str, nbytes: int, report: dict) -> Path:
    """An init_rows entry written the way the pipeline writes one."""
    entry = cache / "init_rows" / key
    with computed_once(entry), atomic_dir(entry) as tmp:
        (tmp / "rows.safetensors").write_bytes(b"\0" * nbytes)
        (tmp / "report.json").write_text(json.dumps(report))
    return entry


def backdate(entry: Path, days: float) -> None:
    """As if written and last used ``days`` ago."""
    when = time.time() - days * DAY
    for path in (entry, lock_path(entry)):
        if path.exists():
            os.utime(path, (when, when))


@pytest.fixture
def cache(tmp_path) -> Path:
    """A cache with two init_rows entries and one base_metrics entry, all written by the real writers."""
    cache = tmp_path / "cache"
    write_rows_entry(
        cache,
        "a" * 24,
        16_000,
        {
            "strategy": "mean",
            "seed": None,
            "num_new": 8000,
            "device": "cpu",
            "computed_by_run": "outputs/pretrain/runs/one",
        },
    )
    write_rows_entry(cache, "b" * 24, 8_000, {"strategy": "random", "seed": 3, "num_new": 8000, "device": "cpu"})
    cached_json(cache / "base_metrics", {"base": 1}, lambda: {"tc_bpc": 5.5, "en_bpc": 1.4})
    return cache


def run_child(code: str) -> subprocess.Popen:
    """A Python process running ``code`` (bailong importable), its stdin a pipe the test closes to end it."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_list_shows_each_kinds_entries_with_size_age_and_producer(cache):
    listing = cli_json("list", "--cache-dir", str(cache))
    entries = {(i["kind"], i["name"]): i for i in listing["items"] if i["what"] == "entry"}
    rows = entries["init_rows", "a" * 24]
    assert rows["bytes"] == 16_000 + len(
        json.dumps(
            {
                "strategy": "mean",
                "seed": None,
                "num_new": 8000,
                "device": "cpu",
                "computed_by_run": "outputs/pretrain/runs/one",
            }
        )
    )
    assert "strategy=mean" in rows["summary"] and "computed_by_run=outputs/pretrain/runs/one" in rows["summary"]
    assert "seed=3" in entries["init_rows", "b" * 24]["summary"]
    (metrics,) = [i for i in entries.values() if i["kind"] == "base_metrics"]
    assert metrics["summary"] == "tc_bpc=5.5 en_bpc=1.4"
    assert not [i for i in listing["items"] if i["what"] == "temp"]
    assert listing["total_bytes"] == sum(i["bytes"] for i in listing["items"])

    text = cli("list", "--cache-dir", str(cache))
    assert text.returncode == 0, text.stderr
    assert "init_rows: 2 entries, 24.2 kB" in text.stdout and "base_metrics: 1 entry" in text.stdout
    row = rf"{'a' * 24} +16\.1 kB +used +\d+ s ago +made +\d+ s ago +strategy=mean"
    assert re.search(row, text.stdout), text.stdout
    only = cli_json("list", "--cache-dir", str(cache), "--kind", "base_metrics")
    assert {i["kind"] for i in only["items"]} == {"base_metrics"}


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from bailong.cache import atomic_dir, computed_once
entry = Path(sys.argv[1]) / "init_rows" / ("c" * 24)
with computed_once(entry), atomic_dir(entry) as tmp:
    (tmp / "rows.safetensors").write_bytes(b"\\0" * 1_000_000)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-write
"""


def test_a_writer_killed_mid_write_leaves_an_orphan_that_prune_removes(cache):
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (orphan,) = [p for p in (cache / "init_rows").iterdir() if p.name.startswith(".c")]
    assert not (cache / "init_rows" / ("c" * 24)).exists()

    (temp,) = [i for i in cli_json("list", "--cache-dir", str(cache))["items"] if i["what"] == "temp"]
    assert temp["state"] == "being written"  # a minute's grace for a writer that holds no lock
    os.utime(orphan, (time.time() - 120,) * 2)
    (temp,) = [i for i in cli_json("list", "--cache-dir", str(cache))["items"] if i["what"] == "temp"]
    assert (temp["state"], temp["owner"], temp["bytes"]) == ("orphan", "c" * 24, 1_000_000)

    result = cli_json("prune", "--cache-dir", str(cache))
    removed = {(a["what"], a["name"]) for a in result["actions"] if a["action"] == "removed"}
    assert removed == {("temp", orphan.name), ("lock", f".locks/{'c' * 24}.lock")}  # its lock: entry never made
    assert not orphan.exists() and result["bytes_before"] - result["bytes_after"] == 1_000_000
    assert visible(cache / "init_rows") == ["a" * 24, "b" * 24]  # finished entries untouched


HOLDER = """
import sys
from pathlib import Path
from bailong.cache import atomic_dir, computed_once
entry = Path(sys.argv[1])
with computed_once(entry), atomic_dir(entry):  # a temporary for an entry that exists: dropped at the end
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def test_prune_never_removes_what_a_live_process_holds(cache):
    held = cache / "init_rows" / ("a" * 24)
    for entry in (held, cache / "init_rows" / ("b" * 24)):
        backdate(entry, 30)
    # a live process holds the lock of entry a (reading it, say) and writes a temporary for it
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(held)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "holding", child.stderr.read()
        live_temps = [p for p in (cache / "init_rows").iterdir() if p.name.startswith(".") and p.name != ".locks"]
        for p in live_temps:
            os.utime(p, (time.time() - 3600,) * 2)  # old, yet its writer is alive
        states = {i["name"]: i["state"] for i in cli_json("list", "--cache-dir", str(cache))["items"]}
        assert states["a" * 24] == "in use" and states["b" * 24] == ""

        result = cli_json("prune", "--cache-dir", str(cache), "--older-than", "0")
        actions = {a["name"]: (a["action"], a["reason"]) for a in result["actions"]}
        assert actions["a" * 24] == ("kept", "in use: another process holds its lock")
        assert actions["b" * 24][0] == "removed"
        assert held.is_dir() and all(p.exists() for p in live_temps)
        assert not (cache / "init_rows" / ("b" * 24)).exists()
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert child.returncode == 0, child.stderr.read()
    result = cli_json("prune", "--cache-dir", str(cache), "--older-than", "0")
    assert any(a["name"] == "a" * 24 and a["action"] == "removed" for a in result["actions"])
    assert visible(cache / "init_rows") == [] and not list((cache / "init_rows" / ".locks").iterdir())


def test_prune_older_than_goes_by_last_use_and_dry_run_removes_nothing(cache):
    old, used = cache / "init_rows" / ("a" * 24), cache / "init_rows" / ("b" * 24)
    backdate(old, 10)
    backdate(used, 10)
    with computed_once(used):  # a run read it just now: its last use is today
        pass

    dry = cli("prune", "--cache-dir", str(cache), "--older-than", "7", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove init_rows/{'a' * 24} (entry, 16.1 kB): last used 10.0 d ago" in dry.stdout
    assert "dry run: nothing removed" in dry.stdout and old.is_dir()

    listing = cli_json("list", "--cache-dir", str(cache))
    (old_bytes,) = [i["bytes"] for i in listing["items"] if i["name"] == old.name]
    result = cli_json("prune", "--cache-dir", str(cache), "--older-than", "7")
    assert result["bytes_before"] == listing["total_bytes"]
    assert result["bytes_before"] - result["bytes_after"] == old_bytes > 16_000
    assert [(a["action"], a["name"]) for a in result["actions"]] == [
        ("removed", "a" * 24),
        ("removed", f".locks/{'a' * 24}.lock"),
    ]
    assert not old.exists() and used.is_dir()

    # --kind limits entries to that kind: the week-old base metrics stay under --kind init_rows
    (metrics,) = (cache / "base_metrics").glob("*.json")
    backdate(metrics, 10)
    cli_json("prune", "--cache-dir", str(cache), "--older-than", "7", "--kind", "init_rows")
    assert metrics.exists()
    cli_json("prune", "--cache-dir", str(cache), "--older-than", "7", "--kind", "base_metrics")
    assert not metrics.exists() and used.is_dir()


def test_default_cache_dir_is_the_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("BAILONG_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == Path(compose_config([]).paths.cache_dir) == tmp_path / "elsewhere"
    monkeypatch.delenv("BAILONG_CACHE")
    assert default_cache_dir() == Path(compose_config([]).paths.cache_dir) == ROOT / ".cache"
    monkeypatch.delenv("BAILONG_ROOT")  # a module run outside run.py (python -m bailong.export): the repository's
    assert default_cache_dir() == ROOT / ".cache"

    (tmp_path / "elsewhere" / "init_rows").mkdir(parents=True)
    proc = cli("list", env_cache=tmp_path / "elsewhere")
    assert proc.returncode == 0 and proc.stdout.startswith(f"{tmp_path / 'elsewhere'}: 0 entries"), proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "name a command: list or prune"),
        (["tidy"], "invalid choice: 'tidy'"),
        (
            ["prune", "--cache-dir", "{cache}", "--older-than", "-1"],
            "--older-than: expected a number of days >= 0, got '-1'",
        ),
        (
            ["prune", "--cache-dir", "{cache}", "--older-than", "week"],
            "--older-than: expected a number of days >= 0, got 'week'",
        ),
        (["prune", "--cache-dir", "{cache}", "--older-than", "nan"], "expected a number of days >= 0, got 'nan'"),
        (
            ["list", "--cache-dir", "{cache}", "--kind", "init_row"],
            "--kind 'init_row': not a cache kind; expected one of base_metrics, init_rows",
        ),
        (["list", "--cache-dir", "{cache}/nope"], "cache directory {cache}/nope does not exist"),
        (["list", "--cache-dir", "{cache}/a_file"], "--cache-dir {cache}/a_file is not a directory"),
        (["list", "--cache-dir", "{cache}", "--older-than", "3"], "unrecognized arguments: --older-than 3"),
    ],
)
def test_bad_arguments_are_clear_errors(args, message, cache):
    (cache / "a_file").write_text("x")
    proc = cli(*[a.format(cache=cache) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message.format(cache=cache) in proc.stderr
    assert visible(cache / "init_rows") == ["a" * 24, "b" * 24]  # an error removes nothing
