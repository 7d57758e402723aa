"""The SFT stage (Bailong-instruct): start → evaluate → fine-tune with LoRA on chat data → evaluate → save.

    python run.py experiment=sft sft.from_run=outputs/pretrain/runs/<run>   # continue that run's adapter
    python run.py experiment=sft sft.from_base=true                         # base + tokenizer + init rows

The start is a pre-training run's adapter (its LoRA, new rows and tokenizer; the adapter keeps training)
or the base built exactly as pre-training builds it. Before and after fine-tuning the same evaluation
runs (``SFT_EVALUATORS``): multiple choice TC/EN, bench rule scores and the judge when configured, bits
per character of the held-out TC/EN text (what SFT costs in language modelling) and of the held-out
answers (``chat_bpc``), and the parallel set's information parity and translation chrF each way
(``parallel_bpc``, ``translation``: bailong/eval/parallel.py). Keys: ``sft/before/...``, ``sft/after/...``;
the after-SFT ``mc/*`` and ``bench/*`` are also written unprefixed for the dashboard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bailong.data.chat import set_chat_template
from bailong.data.sft import SFTDataModule, load_chat_splits
from bailong.data.splits import Splits, load_splits
from bailong.errors import ConfigError
from bailong.model.adapter import META_FILE, check_remote_code, find_adapter, load_adapter, read_meta, save_adapter
from bailong.model.build import count_parameters
from bailong.model.device import global_rank, run_device
from bailong.run_files import ADAPTER_DIR, TOKENIZER_DIR
from bailong.stages.common import (
    build_tokenizers,
    evaluate,
    finish_run,
    finish_wandb,
    fit,
    initial_rows,
    make_model,
    module_kwargs,
    prefixed,
    redacted_config,
    start_run,
    trained_model,
    typed,
)
from bailong.train.sft import SFTModule

log = logging.getLogger(__name__)


def check_sft(cfg: DictConfig) -> Path | None:
    """The adapter directory to start from (None: from the base); a ConfigError naming the key otherwise."""
    if cfg.data.get("chat") is None:
        raise ConfigError("data.chat is not set: the SFT stage needs chat data (use data=sft_chat or experiment=sft)")
    if cfg.sft.from_base:
        if cfg.sft.from_run:
            raise ConfigError(f"sft.from_run={cfg.sft.from_run!r} and sft.from_base=true: choose one start")
        return None
    if not cfg.sft.from_run:
        raise ConfigError(
            "sft.from_run is not set: give a pre-training run directory "
            "(sft.from_run=outputs/pretrain/runs/<run>) or start from the base with sft.from_base=true"
        )
    run_dir = Path(cfg.sft.from_run)
    adapter = find_adapter(run_dir)
    if adapter is not None:
        build = read_meta(adapter)["build"]
        check_remote_code(adapter, build, cfg.model.trust_remote_code)  # before any model is loaded
        if build["pretrained"] != cfg.model.pretrained:  # the adapter decides: it was trained on that base
            log.warning(
                "sft.from_run: the adapter was built on %s, not model.pretrained=%s; using the adapter's "
                "base, quantisation and LoRA settings",
                build["pretrained"],
                cfg.model.pretrained,
            )
        return adapter
    raise ConfigError(
        f"sft.from_run={cfg.sft.from_run!r}: no adapter there ({run_dir}/adapter/{META_FILE} not found); "
        "expected a finished pre-training run directory or its adapter/"
    )


def start_from_base(cfg: DictConfig, splits: Splits, device):
    """Stages 1–2 of pre-training: extended tokenizer, initialised new rows, 4-bit base + LoRA; and how to
    build that model again (rank 0 rebuilds it after FSDP training)."""
    _, ext, base_tok, tok = build_tokenizers(cfg, splits)
    rows, _ = initial_rows(cfg, base_tok, tok, ext.cache_key, splits)
    return (
        make_model(cfg, tok, ext.num_base, rows, device),
        tok,
        lambda: make_model(cfg, tok, ext.num_base, rows, device),
    )


# what the SFT stage measures before and after fine-tuning, in this order (bailong/eval/evaluators.py)
SFT_EVALUATORS = ("mc", "bench", "chat_bpc", "bpc", "parallel_bpc", "translation")


def evaluate_stage(model: Any, tok: Any, cfg: DictConfig, datamodule: SFTDataModule, held_out: dict, out_dir: Path):
    """Instruction-following scores plus bits/char of held-out text and of held-out answers."""
    chat_batches = datamodule.val_batches if datamodule.val_chats else None
    return evaluate(cfg, model, tok, SFT_EVALUATORS, out_dir, texts=held_out, chat_batches=chat_batches)


def run(cfg: DictConfig) -> dict:
    adapter_dir = check_sft(cfg)  # before any model is loaded
    out = start_run(cfg)
    data = typed(cfg.data)
    splits = load_splits(
        data, cfg.paths.cache_dir
    )  # the pre-training corpora: held-out text to score, and the base's tokenizer
    # start: a pre-training run's adapter (trainable again) or the base built as pre-training builds it
    device, rank_zero = run_device(cfg.trainer.accelerator), global_rank() == 0
    if adapter_dir is not None:
        # the user's own model.trust_remote_code, never the adapter's record of it (load_adapter)
        load = dict(is_trainable=True, device=device, trust_remote_code=cfg.model.trust_remote_code)
        model, tok = load_adapter(adapter_dir, **load)
        source = str(adapter_dir)
        rebuild = lambda: load_adapter(adapter_dir, **load)[0]  # noqa: E731
    else:
        model, tok, rebuild = start_from_base(cfg, splits, device)
        source = "base"
    set_chat_template(tok)
    tok.save_pretrained(out / TOKENIZER_DIR)
    params = count_parameters(model)
    metrics: dict[str, Any] = {
        "sft/source": source,
        "params/trainable": params["trainable"],
        "params/total": params["total"],
    }

    train_convs, val_convs = load_chat_splits(data, cfg.paths.cache_dir)
    datamodule = SFTDataModule.from_config(tok, data, train_convs, val_convs, seed=cfg.seed)
    metrics.update(
        {
            "sft/train_conversations": len(train_convs),
            "sft/val_conversations": len(val_convs),
            "sft/train_rows": int(datamodule.train_rows["input_ids"].shape[0]),
        }
    )
    held_out = splits.held_out()

    if cfg.sft.eval_before and rank_zero:
        metrics.update(
            prefixed("sft/before", evaluate_stage(model, tok, cfg, datamodule, held_out, out / "eval_before"))
        )

    module = SFTModule(model, **module_kwargs(cfg))
    trainer, loggers = fit(cfg, module, datamodule, metrics)
    model = trained_model(trainer, model, rebuild)
    if not trainer.is_global_zero:  # DDP/FSDP: rank 0 evaluates and writes
        finish_wandb(loggers)
        return metrics

    if cfg.sft.eval_after:
        after = evaluate_stage(model, tok, cfg, datamodule, held_out, out / "eval_after")
        metrics.update(prefixed("sft/after", after))
        metrics.update({k: v for k, v in after.items() if k.startswith(("mc/", "bench/"))})
    save_adapter(model, tok, out / ADAPTER_DIR, config=redacted_config(cfg))
    return finish_run(out, metrics, loggers, trainer.global_step)
