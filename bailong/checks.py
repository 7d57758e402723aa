"""Configuration checks that run before any heavy work; each error names the key and the valid range."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from bailong.errors import ConfigError  # noqa: F401  (re-exported)
from bailong.model.config import ALL_LINEAR
from bailong.run_files import METRICS_FILE

log = logging.getLogger(__name__)

# Lightning accelerator name -> the torch dispatch key whose bitsandbytes kernels a 4-bit model needs
ACCELERATOR_DEVICE = {"cpu": "CPU", "gpu": "CUDA", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}
HIGH_LR = 1e-2  # above this: allowed, with a warning (bailong.train.config.MAX_LR is the limit)
# key names that hold a credential: such a key added with + gets the "put it in the environment" advice
SECRET_NAME = re.compile(r"api_?key|token|secret|password|passwd|credential", re.IGNORECASE)


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem of ``cfg`` found without loading a model's weights: keys the
    schema does not have, values out of range, an accelerator this machine lacks; warn about risky values."""
    problems = unknown_key_problems(cfg)
    problems += schema_problems(cfg)
    if problems:  # the checks below read values the schema found out of range
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    problems += finetune_problems(cfg)
    if max(cfg.data.seq_len, cfg.eval.seq_len or 0) > cfg.model.max_seq_len:
        problems.append(
            f"data.seq_len={cfg.data.seq_len} / eval.seq_len={cfg.eval.seq_len}: over the model's "
            f"maximum model.max_seq_len={cfg.model.max_seq_len}"
        )
    if cfg.trainer.max_steps <= 0:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps}: must be a positive number of steps")
    problems += train_problems(cfg)
    problems += accelerator_problems(cfg)
    if cfg.quant.name == "nf4":
        problems += quantisation_problems(cfg)
    problems += model_problems(cfg)
    problems += speed_switch_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def finetune_name(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "finetune.name", default="lora")


# the groups whose schema dataclasses check their own ranges (``__post_init__``) when the stages convert them
CHECKED_GROUPS = (
    "model",
    "tokenizer",
    "quant",
    "lora",
    "finetune",
    "data",
    "train",
    "eval",
    "mc",
    "bench",
    "parallel",
    "harness",
    "judge",
)


def schema_problems(cfg: DictConfig) -> list[str]:
    """What each group's dataclass refuses when converted, as the stages convert it for the library; every group
    is converted, so one message lists every out-of-range value. ``lora.*`` is not read by full fine-tuning."""
    problems = []
    for group in CHECKED_GROUPS:
        if group == "lora" and finetune_name(cfg) == "full":
            continue
        if OmegaConf.select(cfg, group) is None:
            continue
        try:
            OmegaConf.to_object(cfg[group])
        except ConfigError as err:
            problems.append(str(err))
    return problems


def finetune_problems(cfg: DictConfig) -> list[str]:
    """``finetune=full`` trains every weight: no 4-bit weights (conf/finetune/full.yaml selects quant=none; an
    explicit quant=nf4 beside it lands here)."""
    if finetune_name(cfg) == "full" and cfg.quant.name == "nf4":
        return [
            "finetune.name=full with quant.name=nf4: full fine-tuning updates every weight, and 4-bit weights "
            "cannot be trained; use quant=none (drop the quant=nf4 override: finetune=full selects quant=none), "
            "or finetune=lora for QLoRA"
        ]
    return []


def speed_switch_problems(cfg: DictConfig) -> list[str]:
    """``model.attn_implementation=flash_attention_2`` can run here (the schema checks the name)."""
    import importlib.util

    problems = []
    if cfg.model.attn_implementation == "flash_attention_2":
        accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn); use sdpa"
            )
        elif accelerator == "cpu" or not device_available("CUDA"):
            problems.append(
                f"model.attn_implementation=flash_attention_2 runs on CUDA GPUs only "
                f"(trainer.accelerator={accelerator!r}); use sdpa"
            )
    return problems


def check_output_dir(out, ckpt_path: str | None) -> None:
    """Refuse to start where an earlier run's results would be overwritten, unless resuming (``ckpt_path``).

    The advice for an unfinished run names a checkpoint that loads (``checkpoint_problem``), never a damaged one
    (a write cut short by a full disk or a kill), and lists the damaged ones. Which: ``last_good.ckpt`` when it is
    the newest file (a NaN/inf or blown-up loss stopped the run: resume from the state before the damage, with a
    lower ``train.lr``), else ``last.ckpt``, else the newest loadable one."""
    from pathlib import Path

    out = Path(out)
    if ckpt_path:
        return
    if (out / METRICS_FILE).is_file():
        raise ConfigError(
            f"{out}/metrics.json exists: this directory holds a finished run, and runs never "
            "overwrite one another; choose another hydra.run.dir (or resume with ckpt_path=...)"
        )
    folder = out / "checkpoints"
    ckpts = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not ckpts:
        return
    damaged = {p: problem for p in ckpts if (problem := checkpoint_problem(p))}
    good = [p for p in ckpts if p not in damaged]
    listed = "; ".join(f"{p.name} ({problem})" for p, problem in damaged.items())
    if not good:
        raise ConfigError(
            f"{folder} holds checkpoints of an unfinished run, but none loads: {listed}. Choose another "
            "hydra.run.dir, or delete those files to start this one over"
        )
    newest = max(good, key=lambda p: p.stat().st_mtime)
    last = folder / "last.ckpt"
    if newest.name == "last_good.ckpt":
        advice = (
            f"it stopped on a non-finite or blown-up loss: resume from the state before the damage with "
            f"ckpt_path={newest} and a lower train.lr"
        )
    else:
        advice = f"resume it with ckpt_path={last if last in good else newest}"
    message = f"{folder} holds checkpoints of an unfinished run: {advice}, or choose another hydra.run.dir"
    if damaged:
        message += f". Damaged (they do not load, do not resume from them): {listed}"
    raise ConfigError(message)


def checkpoint_problem(path) -> str | None:
    """Why the Lightning checkpoint at ``path`` would not load, or None if it does: a dangling link, a file that
    is not a whole zip archive (truncated: the archive's directory is at its end), a member whose CRC fails, or
    contents ``torch.load(weights_only=True)`` refuses. Reads the file once; loads no tensor data (mmap)."""
    import zipfile
    from pathlib import Path

    import torch

    path = Path(path)
    if not path.is_file():
        return "a link to a missing file" if path.is_symlink() else "not a file"
    if path.stat().st_size == 0:
        return "empty"
    if not zipfile.is_zipfile(path):
        return "truncated or not a checkpoint: not a whole zip archive"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"corrupt: member {bad} fails its CRC check"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  zipfile.BadZipFile, pickle/unpickling errors, RuntimeError from torch
        return f"does not load: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return None


def quantisation_problems(cfg: DictConfig) -> list[str]:
    """4-bit settings bitsandbytes accepts, on a device it has 4-bit kernels for."""
    problems = []
    accelerator = run_accelerator(cfg)
    device = ACCELERATOR_DEVICE.get(accelerator)
    if device is None:
        problems.append(
            f"quant.name=nf4 with trainer.accelerator={accelerator!r}: bitsandbytes 4-bit runs on "
            f"{', '.join(ACCELERATOR_DEVICE)}; use quant=none there"
        )
    elif device_available(device) and not bitsandbytes_4bit_on(device):  # a missing device: accelerator_problems
        problems.append(
            f"quant.name=nf4: the installed bitsandbytes has no 4-bit kernels for {device} "
            f"(trainer.accelerator={accelerator!r}); use quant=none or a device it supports"
        )
    return problems


def run_accelerator(cfg: DictConfig) -> str:
    """``trainer.accelerator``, with ``auto`` resolved as Lightning resolves it here (a CUDA GPU if visible)."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator == "auto":
        accelerator = "gpu" if device_available("CUDA") else "cpu"
    return accelerator


def accelerator_problems(cfg: DictConfig) -> list[str]:
    """The accelerator exists on this machine, with at least ``trainer.devices`` CUDA devices, whatever
    ``quant`` is: otherwise Lightning would fail only after the tokenizer, base evaluation and init ran."""
    accelerator = run_accelerator(cfg)
    device = ACCELERATOR_DEVICE.get(accelerator)
    if device is None:  # tpu, hpu, a custom accelerator: Lightning checks those itself
        return []
    if not device_available(device):
        other = ", or quant=none on another accelerator" if cfg.quant.name == "nf4" else ""
        return [f"trainer.accelerator={accelerator!r}: no {device} device is visible to torch (use trainer=cpu{other})"]
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if device == "CUDA" and isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        import torch

        visible = torch.cuda.device_count()
        if devices > visible:
            return [
                f"trainer.devices={devices}: only {visible} CUDA device(s) are visible to torch; "
                f"valid: 1..{visible} (or -1 for all)"
            ]
    return []


def train_problems(cfg: DictConfig) -> list[str]:
    """What ``TrainConfig`` (its ranges) cannot know: a paged optimizer needs a GPU. Warns (does not refuse) about a
    learning rate above ``HIGH_LR``."""
    train, problems = cfg.train, []
    for key in ("lr", "embedding_lr"):
        lr = train[key]
        if lr is not None and lr > HIGH_LR:
            log.warning(
                "train.%s=%g is above %g: AdamW then moves each weight by more than %g per step, which "
                "usually wrecks a pretrained model; continued pre-training uses 1e-5..1e-3",
                key,
                lr,
                HIGH_LR,
                HIGH_LR,
            )
    if train.optimizer.startswith("paged") and not device_available("CUDA"):
        problems.append(
            f"train.optimizer={train.optimizer!r} pages optimizer state to CUDA memory: needs a GPU; use adamw"
        )
    return problems


# -- keys the schema does not have ----------------------------------------------------------------------------
def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """Keys in ``cfg`` that ``bailong.config.Config`` does not define: Hydra refuses them in files and plain
    overrides, but ``+key=value`` adds them unchecked, and nothing would read them (``+lora.rank=8`` is not
    ``lora.r``). Free-form nodes (``logger``, ``callbacks``, fields typed ``Any`` such as ``trainer.strategy`` or
    ``data_files``) may hold any key; ``trainer`` may also hold any argument of its ``_target_`` (Lightning's
    Trainer). Each problem names the key and suggests close matches; a value is never printed."""
    problems: list[str] = []
    _walk_unknown(cfg, "", problems)
    return problems


def _walk_unknown(node, path: str, problems: list[str]) -> None:
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            _walk_unknown(node._get_node(i), f"{path}.{i}", problems)  # Hydra's spelling: +data.tc.0.foo=...
        return
    if not isinstance(node, DictConfig) or node._is_missing() or node._is_none() or node._is_interpolation():
        return
    schema = node._metadata.object_type
    if not dataclasses.is_dataclass(schema):  # a free-form node: any key, not looked into
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    allowed = fields | _target_arguments(node)
    for key in node.keys():
        child_path = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            problems.append(_unknown_key_message(child_path, str(key), path, sorted(fields)))
        else:
            _walk_unknown(node._get_node(key), child_path, problems)


def _target_arguments(node: DictConfig) -> set[str]:
    """The keyword arguments of the class a node instantiates (``_target_``), e.g. every Trainer argument."""
    import inspect

    target = node._get_node("_target_") if "_target_" in node else None
    if target is None or target._is_interpolation():
        return set()
    try:
        from hydra.utils import get_class

        return set(inspect.signature(get_class(str(target._value()))).parameters)
    except Exception:  # noqa: BLE001  an unimportable target fails when instantiated, with Hydra's own message
        return set()


def _unknown_key_message(key_path: str, key: str, parent: str, fields: list[str]) -> str:
    where = parent or "the top level"
    parts = [
        f"{key_path}: {where} has no key {key!r}; it was added with +{key_path}=..., and nothing reads it "
        "(+ adds keys unchecked)"
    ]
    if SECRET_NAME.search(key):  # no "did you mean judge.api_key_env": that field takes a variable's name
        env = " (judge.api_key_env names it; default JUDGE_API_KEY)" if parent == "judge" else ""
        parts.append(
            "credentials never go into the config or on the command line, where they would be saved and "
            f"logged: export the key in an environment variable{env} instead"
        )
        return "; ".join(parts)
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
    if close:
        parts.append("did you mean " + " or ".join(f"{parent + '.' if parent else ''}{c}" for c in close) + "?")
    if len(fields) <= 12:
        parts.append(f"{where}'s keys: {', '.join(fields)}")
    return "; ".join(parts)


def bitsandbytes_4bit_on(device: str) -> bool:
    """Whether bitsandbytes has a 4-bit dequantisation kernel for the torch dispatch key ``device``: its own
    or its portable pure-torch one (CompositeExplicitAutograd)."""
    import bitsandbytes  # noqa: F401  registers its torch.library ops and their per-device kernels
    import torch

    op = "bitsandbytes::dequantize_4bit"
    try:
        return any(
            torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for key in (device, "CompositeExplicitAutograd")
        )
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
        problems.append(
            f"data.seq_len={cfg.data.seq_len} / eval.seq_len={OmegaConf.select(cfg, 'eval.seq_len')}: "
            f"over {cfg.model.pretrained}'s max_position_embeddings={limit}; valid: 2..{limit}"
        )
    names = _module_names(cfg, config)
    if names is None:
        return problems
    if cfg.quant.name == "nf4":
        skip = set(cfg.quant.skip_modules or ["lm_head"])
        # transformers' bitsandbytes integration replaces nn.Linear and GPT-2-style Conv1D projections
        linear = [n for n, kind in names.items() if kind in ("Linear", "Conv1D") and n.rsplit(".", 1)[-1] not in skip]
        if not linear:
            problems.append(
                f"quant.name=nf4: {config.model_type} model {cfg.model.pretrained} has no nn.Linear layers "
                "outside quant.skip_modules for bitsandbytes to quantise; use quant=none"
            )
    targets = cfg.lora.target_modules
    if targets == ALL_LINEAR:  # resolved against the model when it is built (bailong.model.build.lora_config)
        targets = []
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing and finetune_name(cfg) != "full":  # full fine-tuning has no LoRA targets
        problems.append(
            f"lora.target_modules: {missing} match no module of {config.model_type} ({cfg.model.pretrained})"
        )
    return problems


def _model_config(cfg: DictConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            cfg.model.pretrained, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
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
