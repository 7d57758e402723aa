"""Continued pre-training (``stage: pretrain``): tokenizer → model → data → train → evaluate.

    python run.py init=zip_tie lora.r=64

Stage 1 extends the tokenizer, stage 2 initialises the new rows and builds the 4-bit base + rows + LoRA, stages
3–4 train on the packed TC/EN mix, stage 5 scores the held-out text before and after and saves the adapter
(README, "What a run writes", has the run directory's layout).
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from bailong.data.pretrain import PretrainDataModule
from bailong.data.splits import load_splits
from bailong.eval.bpc import scoring_seq_len
from bailong.model.adapter import save_adapter
from bailong.model.build import count_parameters
from bailong.model.device import global_rank, run_device
from bailong.run_files import ADAPTER_DIR, INIT_REPORT_FILE, TOKENIZER_DIR
from bailong.stages.common import (
    base_metrics,
    build_tokenizers,
    characters_per_step,
    data_metrics,
    evaluate,
    finish_run,
    finish_wandb,
    fit,
    held_out_evaluators,
    initial_rows,
    make_model,
    module_kwargs,
    prefixed,
    redacted_config,
    start_run,
    token_diagnostics,
    tokenizer_metrics,
    trained_model,
    typed,
)
from bailong.train.pretrain import PretrainModule

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    out = start_run(cfg)
    metrics: dict = {"init/strategy": cfg.init.name}

    data = typed(cfg.data)
    splits = load_splits(data, cfg.paths.cache_dir)  # prepared once (cached): text shards, train/dev/test
    metrics.update(data_metrics(splits))

    # 1 tokenizer: base + appended TC pieces (old ids kept), cached by a hash of its inputs
    base, ext, base_tok, tok = build_tokenizers(cfg, splits)
    tok.save_pretrained(out / TOKENIZER_DIR)
    metrics.update(tokenizer_metrics(base_tok, tok, ext, splits))

    # 2 model: base metrics → new rows by the init strategy (full precision) → 4-bit base + rows + LoRA;
    # every forward pass outside Lightning's loop runs on the run's device (this rank's GPU under DDP)
    device, rank_zero = run_device(cfg.trainer.accelerator), global_rank() == 0
    if cfg.eval.base and rank_zero:
        metrics.update(base_metrics(cfg, base_tok, base.cache_key, splits))
    rows, init_report = initial_rows(cfg, base_tok, tok, ext.cache_key, splits)
    (out / INIT_REPORT_FILE).write_text(json.dumps(init_report, indent=2, ensure_ascii=False))
    model = make_model(cfg, tok, ext.num_base, rows, device)
    params = count_parameters(model)
    metrics.update(
        {
            "params/trainable": params["trainable"],
            "params/total": params["total"],
            "params/trainable_pct": 100.0 * params["trainable"] / params["total"],
            "params/vocab_rows": model.bailong_build["padded_vocab_size"],
        }
    )
    log.info(
        "parameters: %s trainable of %s (%.2f%%)", params["trainable"], params["total"], metrics["params/trainable_pct"]
    )

    # step 0: the extended, initialised model before any update (rank 0 reports; the others go on to fit)
    if rank_zero:
        step0 = evaluate(cfg, model, tok, held_out_evaluators(cfg), out, texts=splits.held_out())
        metrics.update(prefixed("step0", step0))

    # 3 data, 4 train
    datamodule = PretrainDataModule.from_config(
        tok,
        data,
        seed=cfg.seed,
        splits=splits,
        cache_dir=cfg.paths.cache_dir,
        eval_seq_len=scoring_seq_len(model, cfg.eval.seq_len),  # val/* in the windows final/* is scored in
    )
    module = PretrainModule(model, **module_kwargs(cfg))
    trainer, loggers = fit(cfg, module, datamodule, metrics)
    metrics.update(characters_per_step(datamodule, trainer, metrics))
    model = trained_model(trainer, model, lambda: make_model(cfg, tok, ext.num_base, rows, device))
    if not trainer.is_global_zero:  # DDP/FSDP: rank 0 evaluates and writes
        finish_wandb(loggers)
        return metrics

    # 5 evaluate the trained model on the same held-out text (dev: tc_bpc; test: test_tc_bpc); save the adapter
    final = evaluate(cfg, model, tok, held_out_evaluators(cfg), out, texts=splits.held_out())
    metrics.update(prefixed("final", final))
    metrics.update(token_diagnostics(model, tok, ext.num_base, rows, datamodule, out))
    save_adapter(model, tok, out / ADAPTER_DIR, rows=rows, config=redacted_config(cfg))
    return finish_run(out, metrics, loggers, trainer.global_step)
