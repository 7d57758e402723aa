"""The whole experiment on the embedded default: run.py end to end, resume after a crash, reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from conftest import ROOT, compose_config

REQUIRED_KEYS = [
    "tokenizer/added",
    "tokenizer/vocab_size",
    "tokenizer/tc_tokens_per_char_base",
    "tokenizer/tc_tokens_per_char",
    "base/tc_bpc",
    "base/en_bpc",
    "step0/tc_bpc",
    "step0/en_bpc",
    "final/tc_bpc",
    "final/en_bpc",
    "base/test_tc_bpc",  # the test split: the reported figures (dev: every choice)
    "step0/test_tc_bpc",
    "final/test_tc_bpc",
    "final/test_en_bpc",
    "tokenizer/tc_byte_fallback_rate_base",
    "tokenizer/tc_byte_fallback_rate",
    "tokenizer/new_unused_held_out",
    "tokens/consumed",
    "tokens/new_seen",
    "tokens/new_never_seen",
    "params/trainable",
    "params/total",
    "train/tokens_per_sec",
    "train/steps",
    "init/strategy",
]
SMOKE = ["experiment=smoke", "logger=csv"]


def run_py(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from bailong.stages import run

    out = tmp_path_factory.mktemp("smoke")
    cfg = compose_config(SMOKE, output_dir=out)
    return out, cfg, run(cfg)


def test_smoke_run_writes_the_run_directory(smoke_run):
    out, cfg, metrics = smoke_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    assert not missing, missing
    assert metrics["train/steps"] == cfg.trainer.max_steps
    assert metrics["tokenizer/added"] == cfg.tokenizer.added_vocab
    assert metrics["tokenizer/tc_tokens_per_char"] < metrics["tokenizer/tc_tokens_per_char_base"]
    assert 0 < metrics["params/trainable"] < metrics["params/total"]
    # the token diagnostics count what the run consumed: every step's rows, each appended token once per occurrence
    rows = cfg.trainer.max_steps * cfg.trainer.get("accumulate_grad_batches", 1) * cfg.data.batch_size
    assert metrics["tokens/consumed"] == rows * cfg.data.seq_len
    assert metrics["tokens/new_seen"] + metrics["tokens/new_never_seen"] == metrics["tokenizer/added"]
    tokens = json.loads((out / "token_report.json").read_text())["tokens"]
    assert (
        len(tokens) == metrics["tokenizer/added"]
        and sum(t["count"] for t in tokens) == metrics["tokens/new_occurrences"]
    )
    assert metrics["tokenizer/tc_byte_fallback_rate"] < metrics["tokenizer/tc_byte_fallback_rate_base"]
    for key in ("base/tc_bpc", "step0/tc_bpc", "final/tc_bpc", "final/en_bpc"):
        assert 0 < metrics[key] < 20, (key, metrics[key])
    # the parallel set's same content in both languages, scored at base, step 0 and the end (experiment=smoke: 50
    # pairs); the extended tokenizer cuts the tokens per TC character of that text, the English side keeps them
    for stage in ("base", "step0", "final"):
        assert metrics[f"{stage}/parallel/n"] == cfg.parallel.max_pairs == 50
        assert 0 < metrics[f"{stage}/parallel/information_parity"] < 10
    assert metrics["final/parallel/tc_tokens_per_char"] < metrics["base/parallel/tc_tokens_per_char"]
    assert metrics["final/parallel/en_tokens_per_char"] == metrics["base/parallel/en_tokens_per_char"]
    for sub in (
        "tokenizer/tokenizer.json",
        "adapter/adapter_config.json",
        "init_report.json",
        "checkpoints/last.ckpt",
        "csv/metrics.csv",
    ):
        assert (out / sub).exists(), sub
    curve = (out / "csv" / "metrics.csv").read_text()
    assert "val/tc_bpc" in curve and "train/loss" in curve


def test_saved_adapter_reproduces_the_final_metrics(smoke_run):
    from bailong.data.splits import load_splits
    from bailong.eval.bpc import evaluate_texts
    from bailong.model.adapter import load_adapter

    out, cfg, metrics = smoke_run
    model, tok = load_adapter(out / "adapter")
    scores = evaluate_texts(
        model,
        tok,
        load_splits(OmegaConf.to_object(cfg.data)).val(),
        seq_len=cfg.eval.seq_len,
        batch_size=cfg.eval.batch_size,
    )
    assert scores["tc_bpc"] == pytest.approx(metrics["final/tc_bpc"], rel=1e-6)
    assert scores["en_bpc"] == pytest.approx(metrics["final/en_bpc"], rel=1e-6)


def test_quick_cli_run_still_writes_metrics(tmp_path):
    """The README's quick run: one step, yet the full metrics.json (step-0 metrics need no training);
    with the default loggers, W&B writes an offline run (no API key, no network) beside the CSV log."""
    out = tmp_path / "x"
    proc = run_py(
        [
            "init=mean",
            "trainer.max_steps=1",
            f"hydra.run.dir={out}",
            "data.max_val_chars=2000",
            "trainer.enable_progress_bar=false",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(k in metrics for k in REQUIRED_KEYS)
    assert metrics["init/strategy"] == "mean" and metrics["train/steps"] == 1
    assert list((out / "wandb").glob("offline-run-*")), "expected an offline W&B run"
    assert (out / "csv" / "metrics.csv").is_file()


def test_bad_config_value_fails_before_heavy_work(tmp_path):
    proc = run_py(["lora.r=0", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert proc.returncode != 0
    assert "lora.r=0" in proc.stderr and "positive" in proc.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()


@pytest.mark.slow  # a second smoke run, about 40 s
def test_the_byte_level_mini_base_runs_the_whole_pipeline(tmp_path):
    """model=mini_bbpe (models/mini-base-bbpe, Llama 3's tokenizer layout): the same smoke run extends it with new
    tokens and merges, keeps English tokens exactly, and trains, scores and saves as on the SentencePiece base."""
    from bailong.model.adapter import load_adapter
    from bailong.stages import run

    cfg = compose_config([*SMOKE, "model=mini_bbpe"], output_dir=tmp_path)
    metrics = run(cfg)
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    assert not missing, missing
    assert metrics["tokenizer/added"] == cfg.tokenizer.added_vocab and metrics["tokenizer/vocab_size"] == 5000 + 8000
    assert metrics["tokenizer/en_tokens_per_char"] == metrics["tokenizer/en_tokens_per_char_base"]
    assert metrics["tokenizer/tc_tokens_per_char"] < 0.8 * metrics["tokenizer/tc_tokens_per_char_base"]
    # byte-level: the share of TC tokens that are partial characters falls; English has none
    assert metrics["tokenizer/tc_byte_fallback_rate"] < metrics["tokenizer/tc_byte_fallback_rate_base"]
    assert metrics["tokenizer/en_byte_fallback_rate_base"] == metrics["tokenizer/en_byte_fallback_rate"] == 0
    assert metrics["final/tc_bpc"] < metrics["step0/tc_bpc"]
    model, tok = load_adapter(tmp_path / "adapter")
    assert (
        len(tok) == 13000
        and tok.bos_token == "<|begin_of_text|>"
        and not (tmp_path / "adapter" / "tokenizer.model").exists()
    )


@pytest.mark.slow
def curve(run_dir) -> list[dict]:
    """The learning curve of ``csv/metrics.csv``: each row's step, loss, bits/char and learning rates (not the
    wall-clock columns, nor the run's closing summary row, which says whether caches were hit)."""
    import csv

    with (run_dir / "csv" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = ("train/loss", "val/", "lr-")
    curve = [{k: v for k, v in row.items() if v != "" and (k == "step" or k.startswith(keep))} for row in rows]
    return [row for row in curve if len(row) > 1]


def wandb_run_ids(run_dir) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.mark.slow  # ~2 min: two runs of the smoke config, one killed mid-way
def test_killed_run_resumes_to_the_same_result(tmp_path):
    smoke_with_wandb = [
        "data.seq_len=128",
        "data.batch_size=4",
        "data.max_val_chars=2000",
        "train.warmup_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=csv_wandb",
    ]  # experiment=smoke turns W&B off
    common = smoke_with_wandb + [
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "train.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "lora.dropout=0.1",
    ]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    proc = run_py(common + [f"hydra.run.dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    kill = ["+callbacks.kill._target_=bailong.train.callbacks.KillAtStep", "+callbacks.kill.step=3"]
    proc = run_py(common + kill + [f"hydra.run.dir={crashed}"])
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])  # really SIGKILLed
    assert not (crashed / "metrics.json").exists()
    ckpt = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2

    proc = run_py(common + [f"hydra.run.dir={crashed}", f"ckpt_path={ckpt}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((crashed / "metrics.json").read_text())
    assert b["train/steps"] == a["train/steps"] == 6
    for key in ("final/tc_bpc", "final/en_bpc"):
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=0), key
    # the whole learning curve survives the crash (Lightning's CSVLogger alone would have deleted steps 0-1)
    straight_curve, resumed_curve = curve(straight), curve(crashed)
    assert [r["step"] for r in resumed_curve] == [r["step"] for r in straight_curve]
    assert resumed_curve == straight_curve
    # and the W&B run continues: the resumed process logged into the crashed run's id, not a new one
    assert len(list((crashed / "wandb").glob("offline-run-*"))) == 2 and len(wandb_run_ids(crashed)) == 1


def test_eval_command_scores_a_run_and_a_base(smoke_run, tmp_path, capsys):
    from bailong.eval.__main__ import main

    out, cfg, metrics = smoke_run
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("春眠不覺曉，處處聞啼鳥。\n\n夜來風雨聲，花落知多少。\n", encoding="utf-8")
    run_scores = main(["bpc", str(out), "--tc", str(held_out), "--seq-len", "64"])
    assert set(run_scores) >= {"final/tc_bpc", "final/tc_bpb", "final/tc_tokens_per_char"}
    # base/*: the command on the run's own held-out text gives the run's base metrics (the same NF4 base, its own
    # tokenizer, windows and batches), so what a run reports for its base is what the command measures
    from omegaconf import OmegaConf

    from bailong.data.corpus import write_jsonl
    from bailong.data.splits import load_splits

    splits = load_splits(OmegaConf.to_object(cfg.data), cfg.paths.cache_dir)
    window = ["--seq-len", str(cfg.eval.seq_len)] if cfg.eval.seq_len else []  # default: the model's positions
    for split, prefix in (("val", ""), ("test", "test_")):  # dev and test
        files = {
            lang: write_jsonl(
                [{"text": t} for t in getattr(splits, f"{lang}_{split}")], tmp_path / f"{lang}_{split}.jsonl"
            )
            for lang in ("tc", "en")
        }
        base_scores = main(
            [
                "bpc",
                str(ROOT / "models" / "mini-base"),
                "--tc",
                str(files["tc"]),
                "--en",
                str(files["en"]),
                *window,
                "--batch-size",
                str(cfg.eval.batch_size),
                "--quant",
                cfg.quant.name,
            ]
        )
        for lang, what in ((lang, what) for lang in ("tc", "en") for what in ("bpc", "tokens_per_char")):
            scored, reported = base_scores[f"base/{lang}_{what}"], metrics[f"base/{prefix}{lang}_{what}"]
            assert scored == pytest.approx(reported, rel=1e-6, abs=0), (split, lang, what)
    printed = capsys.readouterr().out
    assert '"final/tc_bpc"' in printed and '"base/en_bpc"' in printed  # JSON on stdout


def test_step0_is_the_initialised_model_before_any_update(smoke_run):
    """step0/* equals scoring a model built afresh from the run's tokenizer and the init strategy's rows (LoRA B is
    zero, nothing trained), through bailong.eval.bpc directly: step 0 is not measured after an update or in
    training mode."""
    from omegaconf import OmegaConf

    from bailong.data.splits import load_splits
    from bailong.eval.bpc import bits_per_char
    from bailong.stages.common import build_tokenizers, initial_rows, make_model

    out, cfg, metrics = smoke_run
    splits = load_splits(OmegaConf.to_object(cfg.data), cfg.paths.cache_dir)
    _, ext, base_tok, tok = build_tokenizers(cfg, splits)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab()  # the run's tokenizer
    rows, _ = initial_rows(cfg, base_tok, tok, ext.cache_key, splits)
    model = make_model(cfg, tok, ext.num_base, rows, torch.device("cpu"))
    for name, texts in splits.held_out().items():
        scored = bits_per_char(model, tok, texts, seq_len=cfg.eval.seq_len, batch_size=cfg.eval.batch_size)
        assert scored["bpc"] == pytest.approx(metrics[f"step0/{name}_bpc"], rel=1e-6, abs=0), name
