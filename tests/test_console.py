"""What a run prints: the end-of-run table, each log line once, the step-bounded bar, no known third-party noise."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from bailong.console import SILENCED_WARNINGS, DropMessagesStartingWith, StepProgressBar, progress_bar
from bailong.summary import run_summary
from conftest import ROOT

PRETRAIN_METRICS = {
    "base/tc_bpc": 7.4084, "base/en_bpc": 1.7985, "base/tc_tokens_per_char": 1.3307,
    "step0/tc_bpc": 7.8199, "step0/en_bpc": 1.8061, "step0/tc_tokens_per_char": 0.8351,
    "final/tc_bpc": 7.7616, "final/en_bpc": 1.8057, "final/tc_tokens_per_char": 0.8351,
    "params/trainable": 4423680, "params/total": 14518528, "train/steps": 10, "train/tokens_per_sec": 1667.07,
}  # fmt: skip
HYDRA_LINE = re.compile(r"^\[[\d\- :,]+\]\[([\w.]+)\]\[(\w+)\] - (.*)$")


def table_rows(summary: str) -> dict[str, list[str]]:
    """label -> cells of the bits/char table (the lines between the header and the first fact)."""
    lines = summary.splitlines()
    rows = {}
    for line in lines[2:]:
        label, *cells = re.split(r"\s{2,}", line.strip())
        if not cells or not re.fullmatch(r"[\d.\-]+", cells[0]):
            break
        rows[label] = cells
    return rows


# -- the end-of-run table ----------------------------------------------------------------------------------
def test_pretraining_summary_has_the_three_rows_the_parameters_and_the_outputs(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "wandb" / "offline-run-20261202_161653-ol8rot1b").mkdir(parents=True)
    summary = run_summary(PRETRAIN_METRICS, tmp_path)

    assert summary.splitlines()[1].split() == ["TC", "bpc", "EN", "bpc", "TC", "tokens/char"]
    assert table_rows(summary) == {
        "base": ["7.408", "1.798", "1.331"],
        "step 0": ["7.820", "1.806", "0.835"],
        "final": ["7.762", "1.806", "0.835"],
    }
    assert "4,423,680 of 14,518,528 (30.47%)" in summary
    assert "10 steps, 1,667 tokens/s" in summary
    assert f"{tmp_path}/  metrics.json, adapter/\n" in summary  # csv/metrics.csv was not written: not listed
    assert f"wandb sync {tmp_path}/wandb/offline-run-20261202_161653-ol8rot1b" in summary


def test_missing_metrics_leave_out_their_rows_and_columns(tmp_path):
    no_base = {k: v for k, v in PRETRAIN_METRICS.items() if not k.startswith("base/")}
    no_base.pop("step0/tc_tokens_per_char")
    assert table_rows(run_summary(no_base, tmp_path)) == {
        "step 0": ["7.820", "1.806", "-"],
        "final": ["7.762", "1.806", "0.835"],
    }
    bare = run_summary({"train/steps": 3, "train/tokens_per_sec": None}, tmp_path)
    assert "bpc" not in bare and "trainable" not in bare and "W&B" not in bare
    assert "3 steps\n" in bare


def test_sft_summary_has_before_and_after_rows_with_chat_bits_per_char(tmp_path):
    metrics = {
        "sft/source": "base", "params/trainable": 100, "params/total": 400, "train/steps": 4,
        "sft/before/tc_bpc": 6.0, "sft/before/en_bpc": 2.0, "sft/before/chat_bpc": 3.0, "sft/before/mc/tc_acc": 0.25,
        "sft/after/tc_bpc": 5.5, "sft/after/en_bpc": 2.1, "sft/after/chat_bpc": 2.5,
    }  # fmt: skip
    summary = run_summary(metrics, tmp_path)
    assert summary.splitlines()[1].split() == ["TC", "bpc", "EN", "bpc", "chat", "bpc"]
    assert table_rows(summary) == {
        "before SFT": ["6.000", "2.000", "3.000"],
        "after SFT": ["5.500", "2.100", "2.500"],
    }
    assert "100 of 400 (25.00%)" in summary


def test_several_offline_wandb_sessions_are_synced_with_one_pattern(tmp_path):
    for name in ("offline-run-20261202_100000-abc", "offline-run-20261202_110000-abc"):  # a resumed run
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert f"wandb sync {tmp_path}/wandb/offline-run-*\n" in run_summary(PRETRAIN_METRICS, tmp_path) + "\n"


# -- what is silenced, and only that ------------------------------------------------------------------------
def test_silenced_warnings_match_their_message_and_module_only():
    for category, message, module, _why in SILENCED_WARNINGS:
        text = re.sub(r"\\(.)", r"\1", message) + " (library text)"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
            module_name = module.replace("\\", "")
            warnings.warn_explicit(text, category, "x.py", 1, module=module_name)
            warnings.warn_explicit("another deprecation", category, "x.py", 2, module=module_name)
            warnings.warn_explicit(text, category, "x.py", 3, module="bailong.stages.common")
        assert [w.lineno for w in caught] == [2, 3], message


def test_a_silenced_log_message_is_dropped_and_the_logger_keeps_its_other_records(caplog):
    logger = logging.getLogger("bailong.test_console.noisy")
    drop = DropMessagesStartingWith("Failed to load CPU gemm_4bit_forward from kernels-community")
    logger.addFilter(drop)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
            logger.warning("Failed to load something else")
    finally:
        logger.removeFilter(drop)
    assert [r.getMessage() for r in caplog.records] == ["Failed to load something else"]


# -- the training bar ----------------------------------------------------------------------------------------
def fit_boring(tmp_path, **trainer_kwargs) -> StepProgressBar:
    bar = StepProgressBar()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[bar],
                         default_root_dir=tmp_path, limit_val_batches=0, **trainer_kwargs)  # fmt: skip
    trainer.fit(BoringModel())
    return bar


def test_a_step_bounded_run_names_max_steps_not_epoch_minus_two(tmp_path):
    bar = fit_boring(tmp_path, max_steps=2)
    assert bar._get_train_description(0).strip() == "Epoch 0 (max_steps=2)"
    bar = fit_boring(tmp_path, max_epochs=3, limit_train_batches=1)
    assert bar._get_train_description(0).strip() == "Epoch 0/2"  # Lightning's own label where epochs bound the run


def test_a_disabled_bar_is_no_progress_bar_so_lightning_accepts_it(tmp_path):
    assert isinstance(progress_bar(enabled=True), ProgressBar)
    off = progress_bar(enabled=False)
    assert not isinstance(off, ProgressBar)
    pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[off], default_root_dir=tmp_path)


# -- a whole run's console -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_smoke_run_prints_each_line_once_no_known_noise_and_ends_with_the_table(tmp_path):
    """experiment=smoke's settings with the bar and W&B (offline) on: every log line once on the console and in
    run.log, the bar labelled by steps, no known third-party noise, W&B's end panel off and one sync hint (ours)."""
    hidden = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_QUIET", "WANDB_SILENT")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    out = tmp_path / "run"
    # experiment=smoke's settings without its logger.wandb=null; the bar is on by default
    smoke_with_wandb = ["data.seq_len=128", "data.batch_size=4", "data.max_val_chars=2000", "trainer.max_steps=2",
                        "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "train.warmup_steps=1",
                        "train.checkpoint_every_n_steps=2"]  # fmt: skip
    args = [*smoke_with_wandb, f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]

    log_lines = [m.groups() for line in console.splitlines() if (m := HYDRA_LINE.match(line.strip()))]
    repeated = [line for line, n in Counter(log_lines).items() if n > 1]
    assert log_lines and not repeated, repeated
    assert not [line for line in console.splitlines() if line.startswith("INFO: ")]  # Lightning's own handler
    assert "`Trainer.fit` stopped" in (out / "run.log").read_text()  # Lightning's lines still reach run.log

    for noise in ("kernels-community", "is_gradient_checkpointing", "LeafSpec", "💡 Tip", "Run summary:",
                  "Run history:"):  # fmt: skip
        assert noise not in console, noise
    assert "Epoch 0 (max_steps=2)" in console and "Epoch 0/-2" not in console
    assert console.count("wandb sync") == 1
    summary = console[console.index("run summary") :]
    assert list(table_rows(summary)) == ["base", "step 0", "final"]
    assert "trainable parameters" in summary and "metrics.json, adapter/, csv/metrics.csv" in summary
