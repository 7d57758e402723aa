"""Configuration checks that run before any heavy work; each error names the key and the valid range."""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
# Lightning accelerator name -> the torch dispatch key whose bitsandbytes kernels a 4-bit model needs
ACCELERATOR_DEVICE = {"cpu": "CPU", "gpu": "CUDA", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}


class ConfigError(ValueError):
    """A configuration value outside its valid range."""


def check_config(cfg: DictConfig) -> None:
    problems = finetune_problems(cfg)
    lora_used = finetune_name(cfg) != "full"  # full fine-tuning ignores every lora.* key
    if lora_used and cfg.lora.r <= 0:
        problems.append(f"lora.r={cfg.lora.r}: the LoRA rank must be a positive integer (e.g. 8, 16, 64)")
    if lora_used and cfg.lora.embeddings not in ("new_rows", "full", "lora", "frozen"):
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
    if cfg.quant.name == "nf4":
        problems += quantisation_problems(cfg)
    problems += model_problems(cfg)
    problems += speed_switch_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def finetune_name(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "finetune.name", default="lora")


def finetune_problems(cfg: DictConfig) -> list[str]:
    """``finetune=full`` trains every weight: no 4-bit weights (conf/finetune/full.yaml selects quant=none; an
    explicit quant=nf4 beside it lands here)."""
    name = finetune_name(cfg)
    if name not in ("lora", "full"):
        return [f"finetune.name={name!r}: expected lora or full"]
    if name == "full" and cfg.quant.name == "nf4":
        return ["finetune.name=full with quant.name=nf4: full fine-tuning updates every weight, and 4-bit weights "
                "cannot be trained; use quant=none (drop the quant=nf4 override: finetune=full selects quant=none), "
                "or finetune=lora for QLoRA"]
    return []


def speed_switch_problems(cfg: DictConfig) -> list[str]:
    """``model.attn_implementation`` is a kernel transformers has and this machine can run;
    ``model.pad_vocab_to_multiple_of`` is a positive integer."""
    import importlib.util

    from bailong.model.build import ATTN_IMPLEMENTATIONS

    problems = []
    attn = cfg.model.attn_implementation
    if attn not in ATTN_IMPLEMENTATIONS:
        problems.append(f"model.attn_implementation={attn!r}: expected one of "
                        f"{', '.join(str(a) for a in ATTN_IMPLEMENTATIONS)}")
    elif attn == "flash_attention_2":
        accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
        if importlib.util.find_spec("flash_attn") is None:
            problems.append("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn); use sdpa")
        elif accelerator == "cpu" or not device_available("CUDA"):
            problems.append(f"model.attn_implementation=flash_attention_2 runs on CUDA GPUs only "
                            f"(trainer.accelerator={accelerator!r}); use sdpa")
    pad = cfg.model.pad_vocab_to_multiple_of
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
        problems.append(f"model.pad_vocab_to_multiple_of={pad!r}: expected a positive integer (1: no padding, "
                        "64: tensor-core shapes)")
    return problems


def check_output_dir(out, ckpt_path: str | None) -> None:
    """Refuse to start where an earlier run's results would be overwritten, unless resuming (``ckpt_path``)."""
    from pathlib import Path

    out = Path(out)
    if ckpt_path:
        return
    if (out / "metrics.json").is_file():
        raise ConfigError(f"{out}/metrics.json exists: this directory holds a finished run, and runs never "
                          "overwrite one another; choose another hydra.run.dir (or resume with ckpt_path=...)")
    ckpts = sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    if ckpts:
        last = out / "checkpoints" / "last.ckpt"
        raise ConfigError(f"{out}/checkpoints holds checkpoints of an unfinished run: resume it with "
                          f"ckpt_path={last if last.is_file() else ckpts[-1]}, or choose another hydra.run.dir")


def quantisation_problems(cfg: DictConfig) -> list[str]:
    """4-bit settings bitsandbytes accepts, on a device it has 4-bit kernels for."""
    q, problems = cfg.quant, []
    if q.quant_type not in ("nf4", "fp4"):
        problems.append(f"quant.quant_type={q.quant_type!r}: expected nf4 or fp4")
    if q.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f"quant.compute_dtype={q.compute_dtype!r}: 4-bit layers compute in one of {', '.join(COMPUTE_DTYPES)}")
    if q.quant_storage not in QUANT_STORAGE:
        problems.append(f"quant.quant_storage={q.quant_storage!r}: expected one of {', '.join(QUANT_STORAGE)}")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator == "auto":
        accelerator = "gpu" if device_available("CUDA") else "cpu"
    device = ACCELERATOR_DEVICE.get(accelerator)
    if device is None:
        problems.append(f"quant.name=nf4 with trainer.accelerator={accelerator!r}: bitsandbytes 4-bit runs on "
                        f"{', '.join(ACCELERATOR_DEVICE)}; use quant=none there")
    elif not device_available(device):
        problems.append(f"trainer.accelerator={accelerator!r}: no {device} device is visible to torch "
                        "(use trainer=cpu, or quant=none on another accelerator)")
    elif not bitsandbytes_4bit_on(device):
        problems.append(f"quant.name=nf4: the installed bitsandbytes has no 4-bit kernels for {device} "
                        f"(trainer.accelerator={accelerator!r}); use quant=none or a device it supports")
    return problems


def bitsandbytes_4bit_on(device: str) -> bool:
    """Whether bitsandbytes has a 4-bit dequantisation kernel for the torch dispatch key ``device``: its own
    or its portable pure-torch one (CompositeExplicitAutograd)."""
    import bitsandbytes  # noqa: F401  registers its torch.library ops and their per-device kernels
    import torch

    op = "bitsandbytes::dequantize_4bit"
    try:
        return any(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                   for key in (device, "CompositeExplicitAutograd"))
    except RuntimeError:  # the op is not registered at all: a bitsandbytes without 4-bit support
        return False


def device_available(device: str) -> bool:
    import torch

    if device == "CPU":
        return True
    if device == "CUDA":
        return torch.cuda.is_available()
    if device == "MPS":
        return torch.backends.mps.is_available()
    return bool(getattr(torch, device.lower(), None) and getattr(torch, device.lower()).is_available())


def model_problems(cfg: DictConfig) -> list[str]:
    """Checks against the base model's own config.json (read, not loaded): position limit, and for 4-bit,
    that it has linear projections to quantise and that the LoRA targets exist (an empty model on the
    meta device: no weights, no memory)."""
    config = _model_config(cfg)
    if config is None:
        return []
    problems = []
    limit = getattr(config, "max_position_embeddings", None)
    seq = max(cfg.data.seq_len, OmegaConf.select(cfg, "eval.seq_len", default=None) or 0)
    if limit is not None and seq > limit:
        problems.append(f"data.seq_len={cfg.data.seq_len} / eval.seq_len={OmegaConf.select(cfg, 'eval.seq_len')}: "
                        f"over {cfg.model.pretrained}'s max_position_embeddings={limit}; valid: 2..{limit}")
    names = _module_names(cfg, config)
    if names is None:
        return problems
    if cfg.quant.name == "nf4":
        skip = set(cfg.quant.skip_modules or ["lm_head"])
        # transformers' bitsandbytes integration replaces nn.Linear and GPT-2-style Conv1D projections
        linear = [n for n, kind in names.items() if kind in ("Linear", "Conv1D") and n.rsplit(".", 1)[-1] not in skip]
        if not linear:
            problems.append(f"quant.name=nf4: {config.model_type} model {cfg.model.pretrained} has no nn.Linear layers "
                            "outside quant.skip_modules for bitsandbytes to quantise; use quant=none")
    missing = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing and finetune_name(cfg) != "full":  # full fine-tuning has no LoRA targets
        problems.append(f"lora.target_modules: {missing} match no module of {config.model_type} "
                        f"({cfg.model.pretrained})")
    return problems


def _model_config(cfg: DictConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model.pretrained, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:  # a hub id with no network or no access: loading will say why
        log.warning("model checks skipped: cannot read %s's config (%s)", cfg.model.pretrained, err)
        return None


def _module_names(cfg: DictConfig, config) -> dict[str, str] | None:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except (ValueError, KeyError) as err:
        log.warning("model structure checks skipped: %s", err)
        return None
    return {n: type(m).__name__ for n, m in model.named_modules() if n}
