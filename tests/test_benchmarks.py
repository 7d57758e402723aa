"""benchmarks/train_throughput.py: the ceiling, the paired ratios and the head bounds it reports, and (slow) one
round end to end."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import ceiling, head_bounds, paired  # noqa: E402


def test_ceiling_spends_each_part_at_its_dtypes_rate():
    parts = {
        "projections": {"flops": 6e9, "dtype": "bfloat16"},  # 6 ms at 1 TFLOP/s
        "head": {"flops": 4e8, "dtype": "float32"},  # 4 ms at 100 GFLOP/s
    }
    top = ceiling(parts, {"bfloat16": 1e12, "float32": 1e11})
    assert top["flops_per_position"] == 6.4e9
    assert top["positions_per_sec"] == pytest.approx(100.0)  # 1 / (6 ms + 4 ms)


def test_ratios_are_the_median_of_each_rounds_ratio():
    def run(tps, peak):
        return {"tokens_per_sec": tps, "peak_rss_training_mib": peak, "peak_rss_mib": 9e9}

    runs = {
        "bailong": [run(300, 100), run(150, 100), run(330, 90)],
        "hf_packed": [run(200, 200), run(100, 100), run(100, 100)],  # the third round hit hf_packed's load
    }
    ratio = paired(runs, "bailong", "hf_packed")
    assert ratio["tokens_per_sec_each_round"] == [1.5, 1.5, 3.3]
    assert ratio["tokens_per_sec"] == 1.5  # the median round: one loaded round does not move it
    assert ratio["peak_memory"] == 0.9  # memory of the training window, not the process's lifetime


def test_head_bounds_are_the_baselines_time_over_the_head_free_step():
    parts = {"projections": {"flops": 3e9, "dtype": "bfloat16"}, "head": {"flops": 1e8, "dtype": "float32"}}
    runs = {  # seconds per position: baseline 1/50 = 20 ms; head-free 1/100 = 10 ms, then 1/80
        "hf_packed": [{"positions_per_sec": 50.0}, {"positions_per_sec": 50.0}],
        "head_free": [{"positions_per_sec": 100.0}, {"positions_per_sec": 80.0}],
    }
    bounds = head_bounds(runs, parts, {"bfloat16": 1e12, "float32": 1e10})  # the head: 10 ms at 10 GFLOP/s
    assert bounds["head_free_each_round"] == [2.0, 1.6]
    assert bounds["head_free"] == 1.8  # the median of two rounds
    assert bounds["head_at_ceiling"] == pytest.approx(statistics.median([20 / 20, 20 / 22.5]), abs=1e-3)
    # the ceiling: 3 ms of projections + 10 ms of head per position, against 20 and 22.5 ms
    assert bounds["fraction_of_ceiling_at_most"] == pytest.approx(statistics.median([13 / 20, 13 / 22.5]), abs=1e-3)


@pytest.mark.slow  # ~2 min: one round of two sides on the mini base, in their own processes
def test_one_round_reports_ratios_ceiling_and_load():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_throughput.py"),
            *("--models", "mini", "--precisions", "bf16", "--sides", "bailong", "hf_packed", "head_free"),
            *("--repeats", "1", "--steps", "3", "--warmup", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads(proc.stdout)["runs"]["mini/bf16"]
    sides = entry["sides"]
    assert set(sides) == {"bailong", "hf_packed", "head_free"} and entry["ceiling"]["dtypes"]["head"] == "bfloat16"
    # the step without head and loss is faster than bailong's whole step, and bounds the ratio from above
    assert sides["head_free"]["tokens_per_sec"] > sides["bailong"]["tokens_per_sec"]
    assert entry["bound_vs_hf_packed"]["head_free"] > entry["ratios"]["bailong_vs_hf_packed"]["tokens_per_sec"]
    speed = sides["bailong"]["tokens_per_sec"] / sides["hf_packed"]["tokens_per_sec"]
    assert entry["ratios"]["bailong_vs_hf_packed"]["tokens_per_sec"] == pytest.approx(speed, rel=1e-2)
    achieved = sides["bailong"]["positions_per_sec"] / entry["ceiling"]["positions_per_sec"]
    assert entry["fraction_of_ceiling"] == pytest.approx(achieved, abs=1e-3)
    assert all(len(r["load_average_1m"]) == 2 for s in sides.values() for r in s["rounds"])
