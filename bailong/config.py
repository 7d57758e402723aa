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

# importing the strategies registers each one's options class as the `init` group option of its name
from bailong.embedding import InitOptions


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:BAILONG_ROOT,.}"
    data_dir: str = "${paths.root_dir}/data"
    models_dir: str = "${paths.root_dir}/models"
    # tokenizers and base metrics are cached here by a hash of their inputs, shared by sweep jobs
    cache_dir: str = "${oc.env:BAILONG_CACHE,${paths.root_dir}/.cache}"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class RandomBaseConfig:
    """A base with a real model's shapes and seeded random weights, built at ``model.pretrained`` when
    missing (bailong/model/random_base.py): real widths without downloading weights."""

    architecture: str = "llama2_7b"  # a name in bailong.model.random_base.ARCHITECTURES
    num_layers: int = 2
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: str = MISSING  # local directory or Hugging Face hub id
    tokenizer: str | None = None  # base tokenizer (dir, .model file or hub id); default: pretrained
    revision: str | None = None
    dtype: str = "float32"  # dtype of the unquantised parts (embeddings, head, norms, LoRA)
    trust_remote_code: bool = False
    max_seq_len: int = 1024  # the model's position limit; data.seq_len may not exceed it
    random_base: RandomBaseConfig | None = None  # set: build a random base at `pretrained` if absent
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2 (flash-attn installed, GPU)
    # the extended vocabulary's embedding/head rows rounded up (59,241 -> 59,264) for tensor-core shapes;
    # padding rows are zero, never sampled and outside every softmax. 1: no padding
    pad_vocab_to_multiple_of: int = 64


@dataclass
class TokenizerConfig:
    name: str = "extend"
    added_vocab: int = 8000  # pieces appended to the base vocabulary (0 = keep the base tokenizer)
    character_coverage: float = 0.9995
    seed: int = 0


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
class FinetuneConfig:
    """What trains (conf/finetune/): ``lora`` (default) per ``lora.*`` on a frozen (4-bit) base, or ``full``:
    every weight of the resized base, no LoRA, no quantisation (``lora.*`` ignored)."""

    name: str = "lora"  # lora | full


@dataclass
class CorpusConfig:
    path: str = MISSING
    format: str | None = None  # txt | jsonl | hub (default: from the file name)
    text_field: str = "text"
    name: str | None = None  # hub: data set configuration
    split: str = "train"  # hub: split to read
    data_files: Any | None = None  # hub: e.g. the "json" builder on local files
    revision: str | None = None
    streaming: bool = False
    max_docs: int | None = None  # documents kept (after conversion and deduplication)
    convert: str | None = None  # OpenCC conversion per document, e.g. s2twp (Simplified -> Taiwan Traditional)


@dataclass
class DedupConfig:
    """Document-level dedup per language, across its corpora, before the split (bailong/data/dedup.py)."""

    exact: bool = True  # hash of the normalised text
    near: float | None = 0.8  # MinHash LSH Jaccard threshold over character shingles; null: exact only
    num_perm: int = 128
    ngram: int = 5  # characters per shingle


@dataclass
class ChatCorpusConfig:
    """One chat corpus: JSON Lines of {"messages": [{"role", "content"}]} or a hub data set in that format."""

    path: str = MISSING
    format: str | None = None  # jsonl | hub (default: from the file name)
    messages_field: str = "messages"
    name: str | None = None  # hub: data set configuration
    split: str = "train"
    data_files: Any | None = None
    revision: str | None = None
    streaming: bool = False
    max_records: int | None = None


@dataclass
class InstructConfig:
    """The instruction set generated from the Tang poems (bailong/data/instruct.py)."""

    poems: str = "${paths.data_dir}/zh_tw/poetry_tang.jsonl.gz"
    max_train: int | None = None  # conversations (at most one per poem)
    max_val: int | None = 64
    en_share: float = 0.4  # conversations asked in English
    multi_turn_share: float = 0.3
    system_share: float = 0.2
    seed: int = 0


@dataclass
class ChatDataConfig:
    instruct: InstructConfig | None = None  # generated Tang-poem set (null: none)
    files: list[ChatCorpusConfig] = field(default_factory=list)  # chat corpora, split by data.val_fraction
    max_val: int = 64  # held-out conversations per source scored as val/chat_bpc
    packing: bool = True  # whole conversations packed into data.seq_len rows (block-diagonal attention)


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
    max_val_chars: int | None = 20000  # per language, so evaluation takes seconds on a CPU
    # off by default (the shipped data pack is clean); hub corpora turn it on: {exact: true, near: 0.8}
    dedup: DedupConfig = field(default_factory=lambda: DedupConfig(exact=False, near=None))
    chat: ChatDataConfig | None = None  # SFT stage: the chat data (conf/data/sft_chat.yaml)


@dataclass
class TrainConfig:
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    lr: float = 2e-4
    embedding_lr: float | None = None  # new-row parameters; default: lr
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
    check_val_every_n_epoch: int | None = None
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 5
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    deterministic: Any = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    default_root_dir: str = "${paths.output_dir}"


@dataclass
class EvalConfig:
    batch_size: int = 8
    seq_len: int | None = None  # default: data.seq_len
    base: bool = True  # also score the base model with the base tokenizer (cached)


@dataclass
class MCConfig:
    """Multiple choice by log-likelihood (bailong/eval/choice.py): sets generated from held-out text
    (bailong/eval/mc_sets.py) plus any MC files in the documented JSONL format."""

    name: str = "held_out"
    tc_sources: list[CorpusConfig] = field(default_factory=list)  # held-out documents → "next line" items
    en_sources: list[CorpusConfig] = field(default_factory=list)
    items_per_lang: int = 200
    num_choices: int = 4
    context_lines: int = 2  # lines of the document before the answer line
    en_length_tolerance: float = 0.2  # English distractors within ±20% of the answer's characters
    seed: int = 0
    files: list[str] = field(default_factory=list)  # extra MC files: metrics mc/<file stem>_acc
    max_len: int = 256  # tokens per scored question + choice (question cut from the left)
    batch_size: int = 16


@dataclass
class BenchConfig:
    """Bailong-bench-style runner (bailong/eval/bench.py): prompts by category in both languages."""

    name: str = "default"
    prompts: str = MISSING  # JSONL: {"id", "category", "lang", "prompt", "expected_lang"?}
    system_prompt: str | None = None
    max_new_tokens: int = 128
    do_sample: bool = False  # greedy by default: rule scores do not move between runs
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    seed: int = 0
    max_prompts: int | None = None


@dataclass
class JudgeConfig:
    """LLM judge through an OpenAI-compatible chat-completions endpoint (bailong/eval/judge.py).
    Off while ``base_url`` is null. The API key is read from the environment variable ``api_key_env``
    and never stored in configs or outputs."""

    name: str = "mt_bench_single"
    base_url: str | None = None  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = "gpt-4o-mini"
    api_key_env: str = "JUDGE_API_KEY"
    system_prompt: str = ""
    prompt_template: str = MISSING  # {question} {answer} {expected_language}
    rating_pattern: str = "\\[\\[(\\d+\\.?\\d*)\\]\\]"
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout_s: float = (
        60.0  # per attempt, wall clock: connect, send and the whole reply (a trickling server is cut off)
    )
    max_retries: int = 4  # attempts after the first, on timeouts, 429/5xx and malformed replies
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k, at most max_backoff_s
    max_backoff_s: float = 30.0


@dataclass
class SFTConfig:
    """The SFT stage (bailong/sft_pipeline.py, ``stage: sft``)."""

    from_run: str | None = None  # a pre-training run directory (its adapter/ is fine-tuned further)
    from_base: bool = False  # instead: the base + extended tokenizer + init rows, as pre-training builds them
    eval_before: bool = True  # evaluate_instruct + held-out bits/char before fine-tuning
    eval_after: bool = True


@dataclass
class Config:
    task_name: str = "pretrain"
    stage: str = "pretrain"  # pretrain | sft
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
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> instantiable Lightning logger
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> instantiable Lightning callback


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


# Resolvers that name a run by its place in a sweep (conf/logger/wandb.yaml): one W&B group per sweep,
# the swept values as tags and config, so the W&B UI compares a sweep's runs without hand work.
def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def sweep_group(task_name: str) -> str:
    """``<task_name>-<sweep dir name>`` in a multirun (one group per sweep), else ``task_name``."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return task_name


def override_value(text: str) -> Any:
    """An override's value typed as YAML (``8`` → 8, ``random`` → "random"); lists and dicts stay text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def override_values() -> dict[str, Any]:
    """The run's command-line and swept overrides as ``{key: value}`` (``lora.r=8`` → ``{"lora.r": 8}``)."""
    values = {}
    for override in task_overrides():
        key, _, text = override.lstrip("+~").partition("=")
        values[key] = override_value(text)
    return values


def override_tags(*fixed: str) -> list[str]:
    """``fixed`` tags, then one ``key=value`` tag per override not already among them (W&B allows 64 chars)."""
    tags = list(fixed) + [o.lstrip("+~") for o in task_overrides()]
    return [t[:64] for t in dict.fromkeys(tags)]


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
