"""The steps every stage shares: the run directory and its checks, the tokenizers, the model and its initial
rows, the Lightning fit with its loggers, the evaluation under the training precision, the metrics written last.

Each step is one call into its package (bailong.tokenization, bailong.embedding, bailong.model, bailong.data,
bailong.train, bailong.eval); the stages (pretrain.py, sft.py) call them in order.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from bailong.cache import atomic_dir, cache_key, cached_json, computed_once, fingerprint, hash_texts
from bailong.checks import check_config, check_output_dir
from bailong.data.prepare import SPLITS, prepared_counts
from bailong.data.splits import Splits
from bailong.data.windows import WINDOW_RULES
from bailong.embedding import global_rng_kept, resize_and_initialize, rows_depend_on
from bailong.embedding.diagnostics import (
    effective_new_rows,
    row_metrics,
    row_report,
    token_counts,
    tokenizer_report,
)
from bailong.eval.evaluators import EvalContext, run_evaluators
from bailong.files import write_json_atomically
from bailong.model.build import build_model, load_base_model, new_rows
from bailong.model.device import autocast, run_device
from bailong.model.random_base import ensure_random_base
from bailong.overrides import task_overrides
from bailong.redact import check_env_var_name, redact, run_secrets
from bailong.run_files import METRICS_FILE, TOKEN_REPORT_FILE
from bailong.tokenization import extend_tokenizer, load_tokenizer, tokens_per_char
from bailong.train.callbacks import GatherFullState
from bailong.train.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger(__name__)


def typed(node: DictConfig) -> Any:
    """A composed config group as its schema's dataclass (``cfg.model`` → ``ModelConfig``), range-checked by the
    dataclass's ``__post_init__``: the library below the stages takes these objects, never a DictConfig."""
    return OmegaConf.to_object(node)


def start_run(cfg: DictConfig) -> Path:
    """The run directory, after the cheap checks that must pass before any heavy work."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_env_var_name("judge.api_key_env", OmegaConf.select(cfg, "judge.api_key_env"))
    check_output_dir(out, cfg.ckpt_path)  # never overwrite an earlier run's results
    # model.random_base: build the random real-width base first (seconds; once), so the checks read its config
    ensure_random_base(typed(cfg.model))
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    return out


def build_tokenizers(cfg: DictConfig, splits: Splits):
    """``(base, extended, base_tok, tok)``: the extended tokenizer and the base one built the same way
    (added_vocab=0), so base ids encode identically in both."""
    base_src, cache = cfg.model.tokenizer or cfg.model.pretrained, Path(cfg.paths.cache_dir)
    ext = extend_tokenizer(
        base_src,
        splits.tc_train,
        cfg.tokenizer.added_vocab,
        cache,
        revision=cfg.model.revision,
        character_coverage=cfg.tokenizer.character_coverage,
        seed=cfg.tokenizer.seed,
    )
    base = extend_tokenizer(base_src, [], 0, cache, revision=cfg.model.revision)
    return base, ext, load_tokenizer(base.path), load_tokenizer(ext.path)


def make_model(cfg: DictConfig, tok, num_base: int, rows: dict | None, device) -> torch.nn.Module:
    """The model to train, as ``cfg`` asks: base + extended vocabulary + rows, then LoRA (or every weight)."""
    finetune = typed(cfg.finetune)
    model = build_model(
        typed(cfg.model),
        vocab_size=len(tok),
        num_base=num_base,
        rows=rows,
        quant=typed(cfg.quant),
        lora=None if finetune.full else typed(cfg.lora),  # full fine-tuning reads no lora.* key
        finetune=finetune,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        device=device,
    )
    if cfg.model.get("random_base") is not None:  # a reload rebuilds the random base if its cache is gone
        model.bailong_build["random_base"] = OmegaConf.to_container(cfg.model.random_base, resolve=True)
    return model


def trained_model(trainer: pl.Trainer, model: torch.nn.Module, rebuild) -> torch.nn.Module:
    """The trained model, whole, on the device it trained on, for rank 0 to evaluate and save.

    Under FSDP each rank holds only a shard of every parameter: ``GatherFullState`` gathered the trainable
    ones onto rank 0 before Lightning's teardown, and they are loaded here into a freshly built model (the
    frozen base is rebuilt from disk, exactly as training built it). Elsewhere Lightning's teardown only
    moved the model to the CPU: it goes back to the device.
    """
    gather = next((c for c in trainer.callbacks if isinstance(c, GatherFullState)), None)
    if gather is None:
        return model.to(trainer.strategy.root_device)
    if not trainer.is_global_zero:
        return model
    fresh = rebuild()
    gather.load_into(fresh)
    return fresh


def evaluate(cfg: DictConfig, model: torch.nn.Module, tok, names: tuple[str, ...], out_dir: Path, **inputs) -> dict:
    """The registered evaluators ``names`` (bailong/eval/evaluators.py) on ``model`` with the run's settings, under
    the autocast training used. ``inputs``: ``texts`` (held-out text per language, for ``bpc``) and
    ``chat_batches`` (for ``chat_bpc``)."""
    ctx = EvalContext.from_config(cfg, model, tok, out_dir, **inputs)
    with autocast(next(model.parameters()).device, cfg.trainer.precision):
        return run_evaluators(names, ctx)


def module_kwargs(cfg: DictConfig) -> dict:
    """The LightningModule's optimisation settings from ``train`` (range-checked by ``TrainConfig``) and
    ``trainer.max_steps``."""
    train = typed(cfg.train)
    return dict(
        lr=train.lr,
        max_steps=cfg.trainer.max_steps,
        optimizer=train.optimizer,
        embedding_lr=train.embedding_lr,
        weight_decay=train.weight_decay,
        betas=tuple(train.betas),
        warmup_steps=train.warmup_steps,
        min_lr_ratio=train.min_lr_ratio,
    )


def fit(
    cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule, metrics: dict
) -> tuple[pl.Trainer, list]:
    """Lightning fit with the configured trainer, loggers and callbacks; adds ``train/*`` to ``metrics``."""
    loggers = make_loggers(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )  # checkpoints are whole or absent
    if isinstance(trainer.strategy, FSDPStrategy):  # rank 0 needs whole parameters to evaluate and save
        trainer.callbacks.append(GatherFullState())
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)  # no unpickling
    metrics["train/seconds"] = time.perf_counter() - started
    metrics["train/steps"] = trainer.global_step
    metrics["train/tokens_per_sec"] = next((c.tokens_per_sec for c in callbacks if hasattr(c, "tokens_per_sec")), None)
    return trainer, loggers


def characters_per_step(datamodule, trainer: pl.Trainer, metrics: dict) -> dict:
    """``train/<lang>_chars_per_step``: characters of training text each optimizer step trains on, per language
    (rows per step x the language's share of the stream x characters per row of its prepared training text; the
    share holds in every batch to one row). Learning curves against TC characters consumed use it: at equal steps
    the extended tokenizer packs more characters into a row than the base's."""
    mix = datamodule.mix
    rows_per_step = datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    out = {}
    for lang, rows, share in (("tc", mix.tc_rows, mix.tc_share), ("en", mix.en_rows, 1 - mix.tc_share)):
        chars = metrics.get(f"data/{lang}_train_chars")
        if rows and chars is not None:
            out[f"train/{lang}_chars_per_step"] = rows_per_step * share * chars / rows
    return out


def finish_run(out: Path, metrics: dict, loggers: list, step: int) -> dict:
    """Log the run's metrics, close W&B, and write ``metrics.json`` last and atomically: a metrics.json on
    disk always belongs to a finished run."""
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        lg.save()
    finish_wandb(loggers)
    write_json_atomically(out / METRICS_FILE, metrics)
    from bailong.summary import run_summary  # the console's last lines; metrics.json has every number

    log.info("%s", run_summary(metrics, out))
    return metrics


def prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in values.items()}


def data_metrics(splits: Splits) -> dict:
    """Documents and characters per language and split as prepared, and the TC sample the tokenizer learnt from."""
    metrics = {"data/tc_sample_docs": len(splits.tc_train), "data/tc_sample_of_docs": splits.tc_train_seen}
    for lang, counts in prepared_counts(splits.prepared).items():
        for split in SPLITS:
            metrics[f"data/{lang}_{split}_docs"] = counts["docs"][split]
            metrics[f"data/{lang}_{split}_chars"] = counts["chars"][split]
        metrics[f"data/{lang}_dedup_removed"] = counts["dedup_removed"]
    return metrics


def tokenizer_metrics(base_tok, tok, ext, splits: Splits) -> dict:
    """Fertility on dev text, byte-fallback rates and the appended pieces held-out text never uses
    (bailong/embedding/diagnostics.py)."""
    return {
        "tokenizer/added": ext.num_added,
        "tokenizer/vocab_size": len(tok),
        "tokenizer/tc_tokens_per_char_base": tokens_per_char(base_tok, splits.tc_val),
        "tokenizer/tc_tokens_per_char": tokens_per_char(tok, splits.tc_val),
        "tokenizer/en_tokens_per_char_base": tokens_per_char(base_tok, splits.en_val),
        "tokenizer/en_tokens_per_char": tokens_per_char(tok, splits.en_val),
        "tokenizer/cached": ext.cached,
        **tokenizer_report(base_tok, tok, ext.num_base, splits.held_out()),
    }


def token_diagnostics(model, tok, num_base: int, initial_rows: dict, datamodule, out: Path) -> dict:
    """``tokens/*`` after training: how often each appended token occurred in the batches the run consumed (the
    data module's global sample count, all ranks) and how far its rows moved from ``initial_rows``; the per-token
    records go to ``token_report.json``. Nothing for a run that appends no token."""
    if len(tok) <= num_base:
        return {}
    stream, consumed = datamodule.stream, datamodule.state_dict()["consumed_samples"]
    rows = (stream.rows[lang][row] for lang, row in map(stream.source, range(consumed)))
    counts = token_counts(rows, len(tok))
    pieces = tok.convert_ids_to_tokens(list(range(num_base, len(tok))))
    final = effective_new_rows(model, num_base, len(tok))
    report = row_report(pieces, counts[num_base:], initial_rows, final)
    metrics = {"tokens/consumed": float(counts.sum()), **row_metrics(report)}
    write_json_atomically(out / TOKEN_REPORT_FILE, {"first_id": num_base, "tokens": report})
    return metrics


def model_identity(cfg: DictConfig) -> dict:
    """What names the base in a cache key: its config and its files (a rebuilt base is a new base)."""
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "weights": fingerprint(cfg.model.pretrained)}


def held_out_evaluators(cfg: DictConfig) -> tuple[str, ...]:
    """What pre-training scores on held-out text at base, step 0 and the end: bits/char, and the parallel set's
    bits/char (information parity) unless ``eval.parallel`` is off."""
    return ("bpc", "parallel_bpc") if cfg.eval.parallel else ("bpc",)


def base_metrics(cfg: DictConfig, base_tok, tokenizer_key: str, splits: Splits) -> dict:
    """Bits/char of the base with its own tokenizer, quantised as this run trains it. Cached: a sweep
    over init, rank or vocabulary shares one base evaluation."""
    key = {
        **model_identity(cfg),
        "tokenizer": tokenizer_key,
        "quant": OmegaConf.to_container(cfg.quant),
        "texts": splits.held_out(),
        "seq_len": cfg.eval.seq_len,  # null: the base's own positions (its config is in model_identity)
        "windows": WINDOW_RULES,
        "batch_size": cfg.eval.batch_size,
        "precision": str(cfg.trainer.precision),
        "parallel": OmegaConf.to_container(cfg.parallel) if cfg.eval.parallel else None,
    }

    def compute() -> dict:
        model = load_base_model(typed(cfg.model), quant=typed(cfg.quant), device=run_device(cfg.trainer.accelerator))
        names = held_out_evaluators(cfg)
        return evaluate(cfg, model, base_tok, names, Path(cfg.paths.output_dir), texts=splits.held_out())

    return prefixed("base", cached_json(Path(cfg.paths.cache_dir) / "base_metrics", key, compute))


def initial_rows(cfg: DictConfig, base_tok, tok, tokenizer_key: str, splits: Splits) -> tuple[dict, dict]:
    """Run the init strategy on a full-precision copy of the base; keep only the new rows.

    Cached by a hash of what the rows depend on (``rows_depend_on``: the strategy's own options, the seed
    and the corpus only where they change its rows), so a sweep over LoRA rank, training settings or, for
    ``mean``, the seed initialises once (zip-tie's shift and distillation run the base over the corpus).
    The base runs on the run's device; the first process computes while the others (DDP ranks, sweep
    jobs) wait and read. Computing leaves the global RNGs as reading does: the run's result does not
    depend on whether the rows were cached."""
    options = typed(cfg.init)
    depends_on = rows_depend_on(options, cfg.seed)
    key = cache_key(
        {
            **model_identity(cfg),
            "tokenizer": tokenizer_key,
            "init": depends_on,
            "texts": hash_texts(splits.tc_train) if depends_on["corpus"] else None,
        }
    )
    cached = Path(cfg.paths.cache_dir) / "init_rows" / key
    with computed_once(cached):
        if (cached / "report.json").is_file():
            report = json.loads((cached / "report.json").read_text())
            return load_file(cached / "rows.safetensors"), {**report, "cached": True}
        device = run_device(cfg.trainer.accelerator)
        with global_rng_kept(device):  # loading and resizing may draw: a cache hit draws nothing
            model = load_base_model(typed(cfg.model), quant=None, device=device)
            report = resize_and_initialize(model, base_tok, tok, options, texts=splits.tc_train, seed=cfg.seed)
        rows = {k: v.cpu() for k, v in new_rows(model, len(base_tok)).items()}
        report["device"] = str(next(model.parameters()).device)
        # for `python -m bailong.cache list`: which run computed the entry (any run with this key reads it)
        report["computed_by_run"] = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False)
        del model
        with atomic_dir(cached) as tmp:
            save_file({k: v.contiguous() for k, v in rows.items()}, tmp / "rows.safetensors")
            (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return rows, {**report, "cached": False}


def config_secrets(cfg: DictConfig) -> list[str]:
    """The run's secrets (bailong.redact.run_secrets): environment keys, secret-named or key-shaped values in the
    config and in its command-line overrides."""
    return run_secrets(cfg, task_overrides())


def redacted_config(cfg: DictConfig) -> dict:
    """The resolved config as it may be written or sent anywhere: no secret in it, by key name or by value."""
    return redact(OmegaConf.to_container(cfg, resolve=True), config_secrets(cfg))


def make_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers, with secrets redacted from their settings and hyper-parameters; a resumed
    run (``ckpt_path``) continues its CSV curve and its W&B run (bailong/train/loggers.py)."""
    import os

    from hydra.utils import get_class

    from bailong.train.loggers import record_wandb_id, resume_kwargs

    loggers, secrets, out = [], config_secrets(cfg), Path(cfg.paths.output_dir)
    for name, lg_cfg in cfg.logger.items():
        if lg_cfg is None:
            continue
        kwargs = resume_kwargs(get_class(lg_cfg._target_), out, cfg.ckpt_path)
        if name == "wandb" and lg_cfg.get("offline") is None:
            kwargs["offline"] = not os.environ.get("WANDB_API_KEY")  # never reach the network unasked
        # resolved and redacted first: a logger's own settings (W&B config, tags) are uploaded too
        lg = instantiate(redact(OmegaConf.to_container(lg_cfg, resolve=True), secrets), **kwargs)
        lg.log_hyperparams(redacted_config(cfg))
        record_wandb_id(lg, out)
        loggers.append(lg)
    return loggers


def finish_wandb(loggers: list) -> None:
    """Close the W&B run so the next job of a multirun starts its own (Lightning does not)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
