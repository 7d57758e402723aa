"""Structured-config schema: every key a config file or override may set, with its type.

Registered as ``config_schema`` and listed first in ``conf/config.yaml``'s defaults, so Hydra rejects a
misspelt key (``lora.rank=8``) and a value of the wrong type before anything runs. Unknown group
options (``init=zip_tye``) are rejected by Hydra itself with the list of valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:BAILONG_ROOT,.}"
    data_dir: str = "${paths.root_dir}/data"
    models_dir: str = "${paths.root_dir}/models"
    # tokenizers and base metrics are cached here by a hash of their inputs, shared by sweep jobs
    cache_dir: str = "${oc.env:BAILONG_CACHE,${paths.root_dir}/.cache}"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: str = MISSING  # local directory or Hugging Face hub id
    tokenizer: Optional[str] = None  # base tokenizer (dir, .model file or hub id); default: pretrained
    revision: Optional[str] = None
    dtype: str = "float32"  # dtype of the unquantised parts (embeddings, head, norms, LoRA)
    trust_remote_code: bool = False
    max_seq_len: int = 1024  # the model's position limit; data.seq_len may not exceed it


@dataclass
class TokenizerConfig:
    name: str = "extend"
    added_vocab: int = 8000  # pieces appended to the base vocabulary (0 = keep the base tokenizer)
    character_coverage: float = 0.9995
    seed: int = 0


@dataclass
class InitConfig:
    """Options of the init strategies (bailong/embedding/); each conf/init/<name>.yaml sets its own."""

    name: str = MISSING
    # random
    std: Optional[float] = None  # None: the model's initializer_range
    # multivariate
    covariance_scale: float = 1.0
    # zip_tie (and distill's starting point)
    input_rule: str = "last"
    output_rule: str = "first_shift"
    shift_estimate: str = "prefix"
    shift_bias: float = 0.5
    absorbed_mass_bias: bool = True  # also correct for the probability mass the new tokens take
    shift_ridge: float = 1e-3
    shift_max_tokens: int = 400_000
    shift_seq_len: int = 512
    shift_batch_size: int = 8
    # distill
    start_from: str = "zip_tie"
    steps: int = 200
    lr: float = 3e-3
    contexts_per_token: int = 4
    context_len: int = 32
    batch_size: int = 16
    output_loss: str = "none"
    hidden_loss_weight: float = 1.0
    max_corpus_tokens: int = 1_000_000


@dataclass
class QuantConfig:
    name: str = "nf4"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # kept out of quantisation


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    embeddings: str = "new_rows"  # new_rows | full | lora | frozen


@dataclass
class CorpusConfig:
    path: str = MISSING
    format: Optional[str] = None  # txt | jsonl | hub (default: from the file name)
    text_field: str = "text"
    name: Optional[str] = None  # hub: data set configuration
    split: str = "train"  # hub: split to read
    data_files: Optional[Any] = None  # hub: e.g. the "json" builder on local files
    revision: Optional[str] = None
    streaming: bool = False
    max_docs: Optional[int] = None


@dataclass
class DataConfig:
    tc: list[CorpusConfig] = field(default_factory=list)
    en: list[CorpusConfig] = field(default_factory=list)
    tc_ratio: float = 0.8  # share of training tokens that are Traditional Chinese
    val_fraction: float = 0.02
    split_seed: int = 0
    seq_len: int = 256
    batch_size: int = 8
    num_workers: int = 0
    max_val_chars: Optional[int] = 20000  # per language, so evaluation takes seconds on a CPU


@dataclass
class TrainConfig:
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    lr: float = 2e-4
    embedding_lr: Optional[float] = None  # new-row parameters; default: lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps
    gradient_checkpointing: bool = False
    checkpoint_every_n_steps: int = 50


@dataclass
class TrainerConfig:
    """Keys are ``lightning.pytorch.Trainer`` arguments."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "32-true"
    max_steps: int = 100
    max_epochs: int = -1
    val_check_interval: Any = 50
    check_val_every_n_epoch: Optional[int] = None
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 5
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    deterministic: Any = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    default_root_dir: str = "${paths.output_dir}"


@dataclass
class EvalConfig:
    batch_size: int = 8
    seq_len: Optional[int] = None  # default: data.seq_len
    base: bool = True  # also score the base model with the base tokenizer (cached)


@dataclass
class Config:
    task_name: str = "pretrain"
    seed: int = 1234
    ckpt_path: Optional[str] = None  # resume from a Lightning checkpoint
    sweep_metric: str = "final/tc_bpc"  # what run.py returns to a Hydra sweeper
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    init: InitConfig = field(default_factory=InitConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> instantiable Lightning logger
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> instantiable Lightning callback


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


register_configs()
