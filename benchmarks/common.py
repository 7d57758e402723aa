"""Shared pieces of the benchmarks: the run's real config, the corpora, a random Llama, timing."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BAILONG_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach a hub
os.environ.setdefault("WANDB_MODE", "offline")

from bailong.config import compose_config  # noqa: E402,F401  (the benchmarks compose configs as run.py does)


def extended_tokenizer(cfg):
    """The splits and the run's extended tokenizer (cached in .cache like a run's), plus its base size."""
    from omegaconf import OmegaConf

    from bailong.data.splits import load_splits
    from bailong.stages.common import build_tokenizers

    splits = load_splits(OmegaConf.to_object(cfg.data))
    _, ext, _, tok = build_tokenizers(cfg, splits)
    return splits, tok, ext


def save_random_llama(
    path: Path,
    *,
    hidden: int,
    layers: int,
    vocab: int,
    intermediate: int,
    heads: int,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama saved as safetensors (what a hub checkpoint looks like to the loader)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mib() -> float | None:
    """VmHWM: peak RSS since the last ``reset_peak_rss`` (or process start)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def run_worker(script: Path, args: list[str], timeout: float) -> dict:
    """Run ``script --worker ...`` in a fresh process (its own peak RSS) and parse its last JSON line."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def machine() -> dict:
    """What the numbers were measured on: thread count and the load other processes put on the CPUs."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def matmul_flops(dtype_name: str, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of one ``[2n, n] @ [n, n]`` matmul on this machine at the current thread count (best of runs)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2 * n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2 * n * n * n / best
