"""Multi-GPU strategies. DDP and FSDP (also FSDP-QLoRA) run here on CPU (gloo, 2 processes); 4-bit DDP's
per-GPU placement needs CUDA and skips with the reason."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from bailong.model.config import LoraConfig, QuantConfig
from conftest import ROOT, base_config, compose_config

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: bitsandbytes 4-bit DDP/FSDP-QLoRA are CUDA paths"
)


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_step.py"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_ddp_ranks_see_different_batches_and_agree_on_gradients(ddp_ranks):
    r0, r1 = ddp_ranks
    assert r0["strategy"] == "DDPStrategy" and r0["world_size"] == 2
    assert not torch.equal(r0["batch"], r1["batch"])  # data parallel: each rank its own row
    assert r0["grads"].keys() == r1["grads"].keys()
    names = list(r0["grads"])
    assert any("lora_A" in n for n in names) and any("trainable_tokens" in n for n in names)
    for name in names:
        torch.testing.assert_close(r0["grads"][name], r1["grads"][name], rtol=0, atol=0, msg=name)


def test_ddp_gradients_are_the_mean_of_the_per_rank_gradients(ddp_ranks):
    """All-reduce averaged: the same model on each rank's batch alone, averaged, gives DDP's gradients."""
    from ddp_step import make_model

    model = make_model()
    reference = {}
    for rank in ddp_ranks:
        model.zero_grad(set_to_none=True)
        ids = rank["batch"]
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                reference[n] = reference.get(n, 0) + p.grad / 2
    ddp = {n.removeprefix("model."): g for n, g in ddp_ranks[0]["grads"].items()}
    assert ddp.keys() == reference.keys()
    # lora_A gets no gradient at step 0 (lora_B starts at zero); lora_B and the new rows do
    assert all(reference[n].abs().sum() > 0 for n in reference if "lora_B" in n or "trainable_tokens" in n)
    for name, grad in reference.items():  # float sums in another order: tolerance relative to the scale
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-12, msg=name)


@pytest.mark.slow
def test_run_py_under_ddp_writes_the_run_once_from_rank_zero(tmp_path):
    """trainer=ddp end to end on CPU: Lightning re-runs run.py for rank 1 into the same run directory;
    rank 0 alone evaluates, saves the adapter and writes metrics.json."""
    import json

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "experiment=smoke",
            "logger=csv",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "quant=none",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/steps"] == 4 and "final/tc_bpc" in metrics
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "train_ddp_process_1.log").is_file()  # rank 1 ran, logging beside rank 0
    assert "metrics:" not in (out / "train_ddp_process_1.log").read_text()  # and wrote no metrics


def _run_py(out, *overrides: str) -> dict:
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_gathers_and_saves_as_ddp_does(tmp_path):
    """trainer=fsdp_cpu end to end: two gloo ranks train a sharded model, the trained parameters are gathered
    onto rank 0, which evaluates and saves. Its metrics equal DDP's on the same two ranks (DDP's gradients are
    the mean of one process's, test above), and the saved adapter reloads to the same numbers. LoRA dropout is 0:
    nothing random differs between the two runs. (Against one process at micro-batch 8 the final bits/char differ
    by ~3e-3 after 4 steps: the summation order differs, and Adam's first updates, ~lr * sign(grad), turn
    rounding in near-zero gradients into whole steps.)"""
    from bailong.data.splits import load_splits
    from bailong.eval.bpc import evaluate_texts
    from bailong.model.adapter import load_adapter

    common = ["experiment=smoke", "logger=csv", "quant=none", "eval.base=false", "lora.dropout=0"]
    sharded = _run_py(tmp_path / "fsdp", *common, "trainer=fsdp_cpu")
    replicated = _run_py(
        tmp_path / "ddp",
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
    )
    assert sharded["train/steps"] == replicated["train/steps"] == 4
    assert sharded["final/tc_bpc"] != sharded["step0/tc_bpc"]  # it trained
    for key in ("step0/tc_bpc", "final/tc_bpc", "final/en_bpc"):  # one reduction, two layouts: 1e-6 bits/char
        assert abs(sharded[key] - replicated[key]) < 1e-6, (key, sharded[key], replicated[key])
    assert "metrics:" not in (tmp_path / "fsdp" / "train_ddp_process_1.log").read_text()  # rank 0 alone writes

    model, tok = load_adapter(tmp_path / "fsdp" / "adapter")
    cfg = compose_config(common, tmp_path / "fsdp")
    scores = evaluate_texts(
        model,
        tok,
        load_splits(OmegaConf.to_object(cfg.data)).val(),
        seq_len=cfg.eval.seq_len,
        batch_size=cfg.eval.batch_size,
    )
    assert abs(scores["tc_bpc"] - sharded["final/tc_bpc"]) < 1e-6


@pytest.mark.slow
def test_fsdp_qlora_trains_on_two_cpu_processes(tmp_path):
    """FSDP-QLoRA (4-bit NF4 weights stored as bf16 so they shard with the rest, bf16-true) on two gloo ranks:
    bitsandbytes' CPU kernels allow it. It trains, rank 0 gathers and saves, and the adapter reloads (4-bit,
    bf16 storage) to the final numbers it reported."""
    import bitsandbytes as bnb

    from bailong.data.splits import load_splits
    from bailong.eval.bpc import evaluate_texts
    from bailong.model.adapter import load_adapter

    overrides = [
        "experiment=smoke",
        "logger=csv",
        "eval.base=false",
        "trainer=fsdp_cpu",
        "trainer.precision=bf16-true",
        "quant.quant_storage=bfloat16",
        "model.dtype=bfloat16",
    ]
    metrics = _run_py(tmp_path / "run", *overrides)
    assert metrics["train/steps"] == 4 and metrics["final/tc_bpc"] != metrics["step0/tc_bpc"]
    model, tok = load_adapter(tmp_path / "run" / "adapter")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    cfg = compose_config(overrides, tmp_path / "run")
    scores = evaluate_texts(
        model,
        tok,
        load_splits(OmegaConf.to_object(cfg.data)).val(),
        seq_len=cfg.eval.seq_len,
        batch_size=cfg.eval.batch_size,
    )
    assert abs(scores["tc_bpc"] - metrics["final/tc_bpc"]) < 1e-6


def test_trainer_configs_build_lightning_strategies(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    ddp = compose_config(["trainer=ddp"], tmp_path)
    assert isinstance(instantiate(ddp.trainer.strategy), DDPStrategy)
    assert ddp.trainer.accelerator == "gpu" and ddp.trainer.devices == 8
    fsdp = compose_config(["trainer=fsdp", "quant.quant_storage=bfloat16", "model.dtype=bfloat16"], tmp_path)
    strategy = instantiate(fsdp.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True
    cpu = compose_config(["trainer=fsdp_cpu", "quant=none"], tmp_path)
    assert isinstance(instantiate(cpu.trainer.strategy), FSDPStrategy) and cpu.trainer.accelerator == "cpu"


def test_fsdp_qlora_storage_must_match_model_dtype():
    from bailong.model.build import load_base_model

    with pytest.raises(ValueError, match="quant.quant_storage=bfloat16 needs model.dtype"):
        load_base_model(
            base_config(str(ROOT / "models" / "mini-base"), dtype="float32"),
            quant=QuantConfig(name="nf4", quant_storage="bfloat16"),
        )


@needs_two_gpus
def test_run_py_qlora_under_ddp_on_two_gpus(tmp_path):
    import json

    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "experiment=smoke",
            "logger=csv",
            "trainer=ddp",
            "trainer.devices=2",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train/steps"] == 4


@needs_two_gpus
def test_qlora_ddp_each_rank_loads_its_own_4bit_copy(monkeypatch):
    from bailong.model.build import load_base_model

    monkeypatch.setenv("LOCAL_RANK", "1")
    model = load_base_model(
        base_config(str(ROOT / "models" / "mini-base"), dtype="bfloat16"), quant=QuantConfig(name="nf4")
    )
    devices = {p.device for p in model.parameters()}
    assert devices == {torch.device("cuda", 1)}


@needs_two_gpus
def test_fsdp_qlora_keeps_one_dtype_per_unit():
    from bailong.model.build import build_model

    model = build_model(
        base_config(str(ROOT / "models" / "mini-base"), dtype="bfloat16"),
        vocab_size=5000,
        num_base=5000,
        rows=None,
        quant=QuantConfig(name="nf4", quant_storage="bfloat16"),
        lora=LoraConfig(r=4),
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
