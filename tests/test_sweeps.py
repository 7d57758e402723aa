"""Sweep presets, failure recording in run.py, and the W&B sweep naming resolvers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, compose_config

PRESETS = {"ablation_init": "init", "ablation_rank": "lora.r", "ablation_vocab": "tokenizer.added_vocab"}


def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import bailong.config  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


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


@pytest.mark.parametrize("preset,swept", PRESETS.items())
def test_ablation_presets_are_multirun_deltas_over_three_seeds(preset, swept):
    default = compose_with_hydra([])
    cfg = compose_with_hydra([f"experiment={preset}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.task_name == preset
    params = cfg.hydra.sweeper.params
    assert len(str(params[swept]).split(",")) >= 3 and len(str(params["seed"]).split(",")) >= 3  # error bars
    # long enough to move the adapters (20-step presets answered nothing), warm-up the default's share
    assert cfg.trainer.max_steps >= 2 * default.trainer.max_steps
    assert cfg.train.warmup_steps / cfg.trainer.max_steps == default.train.warmup_steps / default.trainer.max_steps
    for key in ("model", "quant", "lora", "tokenizer", "init"):  # everything not swept stays the default
        if not swept.startswith(key):
            assert cfg[key] == default[key], key


def test_ablation_vocab_compares_extension_with_no_extension():
    cfg = compose_with_hydra(["experiment=ablation_vocab"])
    values = [int(v) for v in str(cfg.hydra.sweeper.params["tokenizer.added_vocab"]).split(",")]
    default = compose_with_hydra([]).tokenizer.added_vocab
    assert values[0] == 0 and default in values and values == sorted(values)  # the base tokenizer, the default


def test_optuna_preset_composes_with_the_optuna_sweeper():
    cfg = compose_with_hydra(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.sweep_metric == "final/tc_bpc"
    assert math.isinf(cfg.failed_run_value) and cfg.failed_run_value > 0
    assert set(cfg.hydra.sweeper.params) >= {"lora.r", "init", "train.lr"}


def test_sweep_value_rejects_missing_and_non_finite_metrics():
    import run

    assert run.sweep_value({"final/tc_bpc": 7.5}, "final/tc_bpc") == 7.5
    with pytest.raises(run.SweepMetricError, match=r"'final/tc_bpc' is nan.*numeric keys: final/tc_bpc"):
        run.sweep_value({"final/tc_bpc": float("nan")}, "final/tc_bpc")
    with pytest.raises(run.SweepMetricError, match="'final/tc_bcp' is None"):
        run.sweep_value({"final/tc_bpc": 7.5}, "final/tc_bcp")  # a sweeper needs the number
    assert run.sweep_value({"final/tc_bpc": 7.5}, "final/tc_bcp", required=False) is None  # a single run: warn
    with pytest.raises(run.SweepMetricError, match="is inf"):
        run.sweep_value({"final/tc_bpc": float("inf")}, "final/tc_bpc", required=False)


def test_wandb_group_is_the_sweep_and_tags_carry_the_swept_values(tmp_path):
    cfg = compose_config(
        [
            "hydra.mode=MULTIRUN",
            f"hydra.sweep.dir={tmp_path}/2026-11-27_08-00-00",
            "experiment=ablation_rank",
            "lora.r=64",
            "seed=2",
        ],
        output_dir=tmp_path / "3",
    )
    from omegaconf import OmegaConf

    wandb = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    assert wandb["group"] == "ablation_rank-2026-11-27_08-00-00"
    assert wandb["tags"][:2] == ["init=zip_tie", "lora.r=64"] and "experiment=ablation_rank" in wandb["tags"]
    assert len(wandb["tags"]) == len(set(wandb["tags"]))  # lora.r=64 once, though fixed and overridden
    assert wandb["config"]["overrides"] == {"experiment": "ablation_rank", "lora.r": 64, "seed": 2}
    single = compose_config(["lora.r=8"], output_dir=tmp_path / "single")
    assert single.logger.wandb.group == "pretrain"


def test_a_failed_single_run_exits_non_zero_and_records_its_error(tmp_path):
    out = tmp_path / "run"
    proc = run_py(["experiment=smoke", "logger=csv", "lora.r=0", f"hydra.run.dir={out}"])
    assert proc.returncode != 0
    assert "lora.r=0: expected a positive integer: the LoRA rank" in proc.stderr
    error = json.loads((out / "error.json").read_text())
    assert error["type"] == "ConfigError" and "lora.r=0" in error["message"]
    assert "Traceback" in error["traceback"] and "bailong/checks.py" in error["traceback"]
    assert error["overrides"] == ["experiment=smoke", "logger=csv", "lora.r=0"] and error["returned"] is None
    assert not (out / "metrics.json").exists()


def test_optuna_study_goes_on_past_failed_trials(tmp_path):
    """Both trials fail (rank 0 / -1, rejected before any heavy work): each leaves error.json, returns inf,
    and the Optuna sweeper finishes the study instead of stopping at the first failure."""
    sweep = tmp_path / "optuna"
    proc = run_py(
        [
            "hparams_search=optuna",
            "experiment=smoke",
            "logger=csv",
            "lora.r=choice(0,-1)",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = sorted(sweep.glob("*/error.json"))
    assert len(errors) == 2
    assert all(json.loads(p.read_text())["returned"] == float("inf") for p in errors)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == float("inf")


@pytest.mark.slow
def test_multirun_records_the_failed_job_and_finishes_the_rest(tmp_path):
    """`run.py -m` over a good and a bad rank: exit 0, error.json in the bad job, metrics.json in the good,
    and the dashboard lists the failure."""
    from bailong.dashboard import build_dashboard

    sweep = tmp_path / "sweep"
    proc = run_py(["-m", "experiment=smoke", "logger=csv", "lora.r=0,4", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the sweep goes on" in proc.stderr + proc.stdout
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert error["type"] == "ConfigError" and error["job_num"] == 0 and error["returned"] == float("inf")
    assert not (sweep / "0" / "metrics.json").exists()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["train/steps"] > 0
    assert not (sweep / "1" / "error.json").exists()

    dash = build_dashboard([sweep])
    assert [(g.values["lora.r"], g.count("ok"), g.count("failed")) for g in dash.groups] == [(0, 0, 1), (4, 1, 0)]
    assert "ConfigError" in dash.html.read_text()
