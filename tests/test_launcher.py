"""Cluster sweeps: the SLURM launcher config composes against the plugin's schema, and submitit's local
executor (the same job pickling and result collection as on SLURM) runs a 2-job sweep here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import bailong.config  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes_for_a_multi_node_ddp_sweep():
    cfg = compose_with_hydra(
        [
            "hydra/launcher=submitit_slurm",
            "experiment=bailong_7b",
            "trainer=ddp",
            "trainer.devices=8",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one SLURM task per GPU, as many nodes as Lightning expects
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    assert any("BAILONG_CACHE" in line for line in launcher.setup)


def test_local_launcher_config_composes():
    launcher = compose_with_hydra(["hydra/launcher=submitit_local"]).hydra.launcher
    assert launcher._target_.endswith("LocalLauncher") and launcher.gpus_per_node == 0


def test_slurm_launcher_rejects_a_misspelt_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_with_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partitoin=gpu"])


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY",)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            "hydra/launcher=submitit_local",
            "experiment=smoke",
            "logger=csv",
            "trainer.max_steps=2",
            "lora.r=4,8",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((sweep / ".submitit").iterdir()), "submitit wrote no job folders"
    for job, r in (("0", 4), ("1", 8)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        config = (sweep / job / ".hydra" / "config.yaml").read_text()
        assert metrics["train/steps"] == 2 and f"r: {r}" in config
        assert metrics["final/tc_bpc"] > 0
