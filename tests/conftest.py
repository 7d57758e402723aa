"""Shared fixtures: real configs composed from conf/, a repo-root anchor, small real corpora, the tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BAILONG_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bailong.config import compose_config  # noqa: E402  composed as run.py does; tests import it from here
from bailong.model.config import ModelConfig  # noqa: E402


def base_config(pretrained, **settings) -> ModelConfig:
    """The model settings for a test base at ``pretrained``: no vocabulary padding unless asked (shapes stay the
    tokenizer's), the rest the schema's defaults."""
    return ModelConfig(
        name=Path(str(pretrained)).name, pretrained=str(pretrained), **{"pad_vocab_to_multiple_of": 1, **settings}
    )


# experiment=smoke's settings, except that it turns W&B off: the secret and console tests need W&B on
SMOKE_WITH_WANDB = [
    "data.seq_len=128",
    "data.batch_size=4",
    "data.max_val_chars=2000",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "train.warmup_steps=1",
    "train.checkpoint_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "eval.base=false",
    "parallel.max_pairs=50",
]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture
def make_config():
    return compose_config


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 64-token vocabulary, saved with save_pretrained (the guard and fault tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_build.make_tiny_base: a random tiny Llama, its tokenizer extended by 64 Han characters, their rows."""
    from test_build import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny"))


def trained(tiny, quant, embeddings, lora=None):
    """``tiny`` built (test_build.build) with ``quant``, ``embeddings`` and (optionally) ``lora`` settings, every
    trainable parameter moved, as after training (LoRA B starts at zero): what the save, reload and export tests
    save."""
    import torch

    from test_build import build

    model = build(tiny, quant=quant, embeddings=embeddings, lora=lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def smoke_export(tmp_path_factory) -> tuple[Path, Path]:
    """``(run, export)``: a real ``experiment=smoke`` pre-training run on the mini base (extended tokenizer, NF4,
    LoRA, four steps) and its ``bailong.export``, which the GGUF and serving tests hand to the real tools."""
    from bailong.export import export
    from bailong.stages import run

    out = tmp_path_factory.mktemp("smoke_for_export")
    run(compose_config(["experiment=smoke", "logger=csv", "eval.base=false"], output_dir=out / "run"))
    return out / "run", export(out / "run", out / "export")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(command: list[str], health_url: str, log_path: Path, timeout_s: float = 180) -> Iterator[None]:
    """``command`` (a server) running until the block ends, once ``health_url`` answers 200; its output in
    ``log_path``, whose end any failure to start shows."""
    import httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                assert proc.poll() is None, f"the server exited ({proc.returncode}): {log_path.read_text()[-3000:]}"
                try:
                    if httpx.get(health_url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"no server after {timeout_s} s: {log_path.read_text()[-3000:]}"
                time.sleep(1)
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=30)
