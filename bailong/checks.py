"""Configuration checks that run before any heavy work; each error names the key and the valid range."""
from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A configuration value outside its valid range."""


def check_config(cfg: DictConfig) -> None:
    problems = []
    if cfg.lora.r <= 0:
        problems.append(f"lora.r={cfg.lora.r}: the LoRA rank must be a positive integer (e.g. 8, 16, 64)")
    if cfg.lora.embeddings not in ("new_rows", "full", "lora", "frozen"):
        problems.append(f"lora.embeddings={cfg.lora.embeddings!r}: expected new_rows, full, lora or frozen")
    if cfg.tokenizer.added_vocab < 0:
        problems.append(f"tokenizer.added_vocab={cfg.tokenizer.added_vocab}: must be >= 0 (0 = no extension)")
    if not 0.0 <= cfg.data.tc_ratio <= 1.0:
        problems.append(f"data.tc_ratio={cfg.data.tc_ratio}: the TC share of training tokens must be in [0, 1]")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction={cfg.data.val_fraction}: must be in (0, 1)")
    for key in ("seq_len", "batch_size"):
        if cfg.data[key] <= 0:
            problems.append(f"data.{key}={cfg.data[key]}: must be a positive integer")
    seq = cfg.eval.seq_len or cfg.data.seq_len
    if max(cfg.data.seq_len, seq) > cfg.model.max_seq_len:
        problems.append(f"data.seq_len={cfg.data.seq_len} / eval.seq_len={cfg.eval.seq_len}: over the model's "
                        f"maximum model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.quant.name not in ("nf4", "none"):
        problems.append(f"quant.name={cfg.quant.name!r}: expected nf4 or none")
    if cfg.trainer.max_steps <= 0:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps}: must be a positive number of steps")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
