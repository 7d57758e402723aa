"""Data preparation (``stage: prepare``): corpora → text shards → the extended tokenizer → token shards.

    python run.py stage=prepare data=hub_bailong_mix data.prepare.workers=16   # on a CPU node, once
    python run.py experiment=bailong_7b trainer=ddp                            # then training reads the shards

Every step is cached by a hash of its inputs (``bailong/data/prepare.py``), so the training run that follows, each
of its ranks and each job of a sweep over init or LoRA settings find the shards ready and prepare nothing. A killed
prepare, rerun, continues after its last whole shard. The run directory's ``metrics.json`` holds the counts
(documents and characters per language and split, dedup removals, rows) and where the shards are.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from bailong.data.pretrain import PretrainDataModule
from bailong.data.splits import load_splits
from bailong.stages.common import build_tokenizers, data_metrics, finish_run, start_run, tokenizer_metrics, typed

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    out = start_run(cfg)
    data = typed(cfg.data)
    splits = load_splits(data, cfg.paths.cache_dir)
    metrics = data_metrics(splits)
    base, ext, base_tok, tok = build_tokenizers(cfg, splits)
    metrics.update(tokenizer_metrics(base_tok, tok, ext, splits))
    datamodule = PretrainDataModule.from_config(tok, data, seed=cfg.seed, splits=splits, cache_dir=cfg.paths.cache_dir)
    stream = datamodule.stream
    shards = stream.prepared
    metrics.update(
        {
            "data/text_dir": str(splits.prepared.root),
            "data/token_dir": str(shards.root),
            **{f"data/{lang}_rows": len(rows) for lang, rows in stream.rows.items()},
        }
    )
    log.info("prepared: text in %s, token shards in %s", splits.prepared.root, shards.root)
    return finish_run(out, metrics, [], 0)
