"""benchmarks/gpu_check.py: its bookkeeping (budget, guarded parts, tolerances, the GPU table) and, slow, the
whole check at tiny shapes on the CPU (``--cpu-smoke``), whose JSON must hold every part, run or skipped with a
reason. The GPU numbers themselves need a GPU (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_peak_table_reads_device_names():
    assert gpu_check.peak_bf16("NVIDIA H200")[0] == 989.0
    assert gpu_check.peak_bf16("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_check.peak_bf16("NVIDIA H100 80GB HBM3")[0] == 989.0  # from bailong.plan.GPUS
    assert gpu_check.peak_bf16("NVIDIA A100-SXM4-80GB")[0] == 312.0  # from bailong.plan.GPUS
    assert gpu_check.peak_bf16("NVIDIA L40S")[0] == 362.0 and gpu_check.peak_bf16("NVIDIA L4")[0] == 121.0
    peak, why = gpu_check.peak_bf16("NVIDIA A10G")  # not the A10: no guess
    assert peak is None and "--peak-tflops" in why


def test_overrides_merge_later_wins():
    assert gpu_check.merged(["a=1", "b=2"], ["a=3"]) == ["b=2", "a=3"]
    assert "data.seq_len=128" in gpu_check.CPU_SMOKE.model and "data.seq_len=2048" not in gpu_check.CPU_SMOKE.model


def test_metric_comparison_tolerances():
    device = {
        "base/tc_bpc": 5.0,
        "step0/en_bpc": 1.4,
        "final/tc_bpc": 5.09,
        "final/tc_chars": 9000,
        "train/tokens_per_sec": 9000.0,
        "init/strategy": "zip_tie",
        "tokens/embed_change_median_1-9": 0.034,
        "tokens/new_seen": 77.0,
    }
    cpu = {
        "base/tc_bpc": 5.02,
        "step0/en_bpc": 1.5,
        "final/tc_bpc": 5.0,
        "final/tc_chars": 9000,
        "train/tokens_per_sec": 300.0,
        "init/strategy": "zip_tie",
        "only/cpu": 1,
        "tokens/embed_change_median_1-9": 0.031,
        "tokens/new_seen": 77.0,
    }
    out = gpu_check.compare_metrics(device, cpu)
    assert out["metrics"]["base/tc_bpc"]["within"]  # 0.4% < 1% before training
    assert out["outside"] == ["step0/en_bpc"]  # 6.7% is not rounding; final/tc_bpc 1.8% < 2% after training
    assert "train/tokens_per_sec" not in out["metrics"] and out["only_cpu"] == ["only/cpu"]
    assert "tokens/embed_change_median_1-9" not in out["metrics"] and out["metrics"]["tokens/new_seen"]["within"]
    assert not out["within_tolerance"]
    assert gpu_check.compare_metrics({"final/tc_chars": 1}, {"final/tc_chars": 2})["outside"] == ["final/tc_chars"]
    parity = {"final/parallel/information_parity": 1.035, "step0/parallel/information_parity": 1.025}
    reference = {"final/parallel/information_parity": 1.0, "step0/parallel/information_parity": 1.0}
    assert gpu_check.compare_metrics(parity, reference)["outside"] == ["step0/parallel/information_parity"]  # 2.5%


def test_a_failing_part_is_recorded_and_the_next_runs(tmp_path):
    report = gpu_check.Report(tmp_path / "r.json", gpu_check.GPU, budget_s=3600, selected=list(gpu_check.PARTS))

    def broken(entry):
        entry["partial"] = 1
        raise ValueError("no such kernel")

    report.run_part("smoke", broken, needs_s=1)
    report.run_part("qlora_7b", lambda entry: entry.update(result=2), needs_s=1)
    report.run_part("hf_trainer", lambda entry: None, needs_s=10**6)  # more than the budget has left
    report.run_part("attention", lambda entry: None, needs_s=1, blocked="needs qlora_7b's model")
    data = report.finish()
    parts = json.loads((tmp_path / "r.json").read_text())["parts"]
    assert parts == data["parts"]
    assert parts["smoke"]["status"] == "error" and parts["smoke"]["partial"] == 1
    assert parts["smoke"]["error"]["type"] == "ValueError" and parts["smoke"]["error"]["message"] == "no such kernel"
    assert parts["qlora_7b"]["status"] == "ok" and parts["qlora_7b"]["result"] == 2 and "seconds" in parts["qlora_7b"]
    assert parts["hf_trainer"]["status"] == "skipped" and "time budget" in parts["hf_trainer"]["reason"]
    assert parts["attention"]["reason"] == "needs qlora_7b's model"
    assert data["summary"]["status"]["vocab_padding"] == "pending"


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    """The whole check, same code paths, tiny shapes, on the CPU (~2 min on 2 idle cores; more when loaded)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["cpu_smoke"]["switched"]
    assert set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"))
        assert part["status"] == "ok" or part["reason"], name
    parts = report["parts"]

    smoke = parts["smoke"]  # the pipeline twice, the second in a process without CUDA
    assert smoke["device_side"]["metrics"]["train/steps"] == 1 and smoke["cpu_reference"]["returncode"] == 0
    assert smoke["comparison"]["within_tolerance"], smoke["comparison"]["outside"]
    assert {"final/tc_bpc", "step0/en_bpc", "params/trainable"} <= set(smoke["comparison"]["metrics"])

    q = parts["qlora_7b"]  # real vocabulary: 32,000 + 27,241 pieces, padded to a multiple of 64
    assert q["data"]["vocab_size"] == 59241 and q["model"]["embedding_rows"] == q["model"]["head_rows"] == 59264
    assert [t["micro_batch"] for t in q["micro_batches"]] == [1, 2] and q["largest"]["micro_batch"] == 2
    assert "max-micro-batch" in q["search"]
    one = q["micro_batch_1"]
    assert one["fits"] and one["tokens_per_sec"] > 0 and one["steps_timed"] == 2
    assert one["planned"]["rows"] == 59264 and one["planned"]["total_gib"] > one["planned"]["torch_allocated_gib"] > 0
    assert q["flops_per_token"]["model"] > 6 * q["flops_per_token"]["n"]

    hf = parts["hf_trainer"]
    assert hf["hf_packed"]["positions_per_sec"] > 0 and hf["ratio_bailong_over_hf"] > 0
    assert hf["training_arguments_forced"] == {"bf16": True}  # the recipe's bf16-mixed, on the Trainer side too
    eager = parts["attention"]["variants"]["eager"]
    assert eager["status"] == "ok" and eager["model"]["attn_implementation"] == "eager"
    assert eager["ratio_over_reference"] > 0
    assert parts["attention"]["variants"]["flash_attention_2"]["status"] == "skipped"
    unpadded = parts["vocab_padding"]["variants"]["unpadded"]
    assert unpadded["status"] == "ok" and unpadded["model"]["embedding_rows"] == 59241
    assert set(report["summary"]["status"].values()) == {"ok"}
