"""Structured-config schema: every key a config file or override may set, with its type.

Registered as ``config_schema`` and listed first in ``conf/config.yaml``'s defaults, so Hydra rejects a
misspelt key (``lora.rank=8``) and a value of the wrong type before anything runs. Unknown group
options (``init=zip_tye``) are rejected by Hydra itself with the list of valid choices. The ``init`` group's
options are the init strategies' own options classes, registered with the strategies (bailong/embedding/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from bailong.data.config import (  # noqa: F401  (re-exported: the schema's parts by their old names)
    ChatCorpusConfig,
    ChatDataConfig,
    CorpusConfig,
    DataConfig,
    DedupConfig,
    InstructConfig,
)

# importing the strategies registers each one's options class as the `init` group option of its name
from bailong.embedding import InitOptions
from bailong.eval.config import BenchConfig, EvalConfig, HarnessConfig, JudgeConfig, MCConfig, ParallelConfig
from bailong.model.config import FinetuneConfig, LoraConfig, ModelConfig, QuantConfig, RandomBaseConfig  # noqa: F401
from bailong.overrides import override_tags, override_values, sweep_group
from bailong.tokenization.config import TokenizerConfig
from bailong.train.config import TrainConfig, TrainerConfig


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:BAILONG_ROOT,.}"
    data_dir: str = "${paths.root_dir}/data"
    models_dir: str = "${paths.root_dir}/models"
    # tokenizers and base metrics are cached here by a hash of their inputs, shared by sweep jobs
    cache_dir: str = "${oc.env:BAILONG_CACHE,${paths.root_dir}/.cache}"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class SFTConfig:
    """The SFT stage (bailong/stages/sft.py, ``stage: sft``)."""

    from_run: str | None = None  # a pre-training run directory (its adapter/ is fine-tuned further)
    from_base: bool = False  # instead: the base + extended tokenizer + init rows, as pre-training builds them
    eval_before: bool = True  # the SFT_EVALUATORS (bailong/stages/sft.py) before fine-tuning
    eval_after: bool = True


@dataclass
class Config:
    task_name: str = "pretrain"
    stage: str = "pretrain"  # prepare | pretrain | sft
    seed: int = 1234
    ckpt_path: str | None = None  # resume from a Lightning checkpoint
    sweep_metric: str = "final/tc_bpc"  # what run.py returns to a Hydra sweeper
    # what a failed multirun job returns instead (error.json holds why): the worst value of a minimised
    # metric; not NaN, which hydra-optuna-sweeper 1.3 cannot record. Use -inf for a maximised metric.
    failed_run_value: float = float("inf")
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # the `init` group option: one strategy's own options class (bailong/embedding/), which rejects the
    # keys of every other strategy when Hydra composes
    init: InitOptions = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    mc: MCConfig = field(default_factory=MCConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> instantiable Lightning logger
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> instantiable Lightning callback


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


def register_resolvers() -> None:
    for name, fn in (
        ("bailong.sweep_group", sweep_group),
        ("bailong.override_values", override_values),
        ("bailong.override_tags", override_tags),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_config(overrides: Any = (), output_dir: Any = None):
    """``conf/config.yaml`` composed as run.py composes it (schema included), outside ``@hydra.main``: for the
    planner and evaluation CLIs, the benchmarks and the tests. ``output_dir`` is Hydra's runtime output
    directory (what ``paths.output_dir`` resolves to); the result has no ``hydra`` node, as under @hydra.main."""
    import os
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("BAILONG_ROOT", str(root))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


register_configs()
register_resolvers()
