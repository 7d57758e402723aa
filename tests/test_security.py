"""Hostile and careless inputs: an adapter that asks for remote code, API keys that must not reach disk or W&B."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bailong.model.adapter import META_FILE
from conftest import ROOT, SMOKE_WITH_WANDB
from test_build import make_tiny_base
from test_export import saved_adapter

PLANTED = """import os, pathlib
pathlib.Path(os.environ["PLANTED_MARKER"]).write_text("the planted code ran")
from transformers import LlamaConfig
class PlantedConfig(LlamaConfig):
    pass
"""


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A real saved adapter whose bailong_adapter.json asks for remote code and points at a base whose
    config.json maps AutoConfig to a planted Python file."""
    tiny = make_tiny_base(tmp_path_factory.mktemp("tiny"))
    run = saved_adapter(tiny, tmp_path_factory.mktemp("run"))
    planted_base = run / "planted_base"
    shutil.copytree(tiny.path, planted_base)
    config = json.loads((planted_base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "planted.PlantedConfig"}
    (planted_base / "config.json").write_text(json.dumps(config))
    (planted_base / "planted.py").write_text(PLANTED)
    meta_file = run / "adapter" / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["build"].update(pretrained=str(planted_base), trust_remote_code=True)
    meta_file.write_text(json.dumps(meta))
    return run


def cli(command: list[str], args: list[str], marker, tmp_path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PLANTED_MARKER": str(marker),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
    }
    return subprocess.run(
        [sys.executable, "-m", *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "command, args",
    [
        (["bailong.chat"], ["--prompt", "hi", "--max-new-tokens", "2"]),
        (["bailong.eval", "bpc"], ["--tc", "data/zh_tw/poetry_tang.jsonl.gz", "--max-chars", "200"]),
    ],
)
def test_an_adapter_cannot_turn_on_remote_code(hostile_run, tmp_path, command, args):
    marker = tmp_path / "ran.txt"
    proc = cli(command, [str(hostile_run), *args], marker, tmp_path)
    assert not marker.exists(), "the adapter's planted code ran"
    assert proc.returncode != 0
    assert "trust_remote_code=True" in proc.stderr and "--trust-remote-code" in proc.stderr, proc.stderr[-2000:]


def test_the_users_flag_is_what_allows_remote_code(hostile_run, tmp_path):
    """The control: with the user's --trust-remote-code the planted file does run (so the test above would see it)."""
    marker = tmp_path / "ran.txt"
    cli(
        ["bailong.chat"],
        [str(hostile_run), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"],
        marker,
        tmp_path,
    )
    assert marker.read_text() == "the planted code ran"


def test_sft_from_a_hostile_run_is_refused_before_loading(hostile_run, make_config):
    from bailong.stages.sft import check_sft

    cfg = make_config(["experiment=sft", f"sft.from_run={hostile_run}"])
    with pytest.raises(PermissionError, match="trust_remote_code=True"):
        check_sft(cfg)


# -- API keys: redacted by value wherever they go ----------------------------------------------------------
ENV_KEY = "planted-env-secret-0123456789"  # in JUDGE_API_KEY, pulled into the config by interpolation
TYPED_KEY = "sk-planted-typed-0123456789"  # typed on the command line, where it does not belong
DISABLE_REDACTION = """
import runpy, sys
import bailong.redact as r
r.redact_text = lambda text, secrets=(): text
r.redact = lambda obj, secrets=None: obj
sys.argv = ["run.py", *sys.argv[1:]]
runpy.run_path("run.py", run_name="__main__")
"""


def run_py_with_secrets(args: list[str], redaction: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(JUDGE_API_KEY=ENV_KEY, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    command = ["run.py"] if redaction else ["-c", DISABLE_REDACTION]
    return subprocess.run(
        [sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def leaks(out, proc: subprocess.CompletedProcess, secrets=(ENV_KEY, TYPED_KEY)) -> list[str]:
    """Where any secret turns up: files under ``out`` (binary, so W&B's .wandb log too) and the console."""
    found = [
        f"{p.relative_to(out)}" for p in out.rglob("*") if p.is_file() for s in secrets if s.encode() in p.read_bytes()
    ]
    return found + [stream for stream in ("stdout", "stderr") for s in secrets if s in getattr(proc, stream)]


SWEEP_WITH_SECRETS = [
    "-m",
    *SMOKE_WITH_WANDB,
    "logger=csv_wandb",
    f"bench.system_prompt={TYPED_KEY}",  # a key typed into an ordinary field: tag, hparams, logs
    "judge.model=${oc.env:JUDGE_API_KEY}",
]  # an environment key resolved into the config


@pytest.mark.slow
def test_planted_secrets_reach_no_file_tag_log_or_console(tmp_path):
    out = tmp_path / "sweep"
    proc = run_py_with_secrets([*SWEEP_WITH_SECRETS, f"hydra.sweep.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = out / "0"
    assert (job / "metrics.json").is_file() and list((job / "wandb").glob("offline-run-*/*.wandb"))
    assert leaks(out, proc) == []
    # each place still says where a secret was (not silently dropped)
    for where in (job / ".hydra" / "overrides.yaml", job / "csv" / "hparams.yaml", out / "multirun.yaml"):
        assert "<redacted>" in where.read_text(), where


@pytest.mark.slow
def test_the_secret_scan_finds_leaks_when_redaction_by_value_is_off(tmp_path):
    """The control for the test above: the same sweep with redaction turned off leaks into the files it checks."""
    out = tmp_path / "sweep"
    proc = run_py_with_secrets([*SWEEP_WITH_SECRETS, f"hydra.sweep.dir={out}"], redaction=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = leaks(out, proc)
    for where in ("0/.hydra/overrides.yaml", "0/csv/hparams.yaml", "multirun.yaml"):
        assert where in found, found
    assert any(f.endswith(".wandb") for f in found), found


@pytest.mark.parametrize(
    "override, message",
    [
        (f"+judge.api_key={TYPED_KEY}", "judge.api_key"),
        (f"judge.api_key_env={TYPED_KEY}", "looks like an API key itself"),
    ],
)
def test_a_key_on_the_command_line_is_refused_and_recorded_without_it(tmp_path, override, message):
    out = tmp_path / "run"
    proc = run_py_with_secrets(["experiment=smoke", override, f"hydra.run.dir={out}"])
    assert proc.returncode != 0
    error = json.loads((out / "error.json").read_text())
    assert message in error["message"], error["message"]
    assert (out / "error.json").stat().st_mode & 0o044, "error.json is readable like the run's other files"
    assert leaks(out, proc) == []


def test_what_counts_as_a_secret_and_how_text_is_redacted():
    from bailong.redact import REDACTED, check_env_var_name, redact_text, run_secrets

    cfg = {
        "judge": {"api_key_env": "JUDGE_API_KEY", "base_url": "http://127.0.0.1:8000/v1"},
        "model": {"revision": "0123456789abcdef0123456789abcdef01234567"},  # a commit hash is no secret
        "logger": {"wandb": {"notes": "sk-ant-typed-into-notes-123"}},
    }
    overrides = [
        "init=mean",
        "+judge.api_key=plain-words-key-42",
        "judge.api_key_env=0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        "bench.system_prompt=hf_typedTokenValue123",
    ]
    assert set(run_secrets(cfg, overrides)) == {
        "sk-ant-typed-into-notes-123",
        "plain-words-key-42",
        "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        "hf_typedTokenValue123",
    }
    text = (
        "calling http://judge:pw-0123@host/v1 and https://g.example/v1?alt=json&key=AIzaSy000&x=1 "
        "with plain-words-key-42; keyword=fine ?keyword=fine"
    )
    assert redact_text(text, ["plain-words-key-42"]) == (
        f"calling http://judge:{REDACTED}@host/v1 and https://g.example/v1?alt=json&key={REDACTED}&x=1 "
        f"with {REDACTED}; keyword=fine ?keyword=fine"
    )
    check_env_var_name("judge.api_key_env", "MY_JUDGE_KEY_2")  # a name passes
    for pasted in ("sk-proj-abcdef123456", "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "my key"):
        with pytest.raises(ValueError, match="not shown") as err:
            check_env_var_name("judge.api_key_env", pasted)
        assert pasted not in str(err.value)
