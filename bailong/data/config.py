"""The data's configuration: corpora, their split, deduplication, the chat data (``data``).

The entry point converts the composed config once (``OmegaConf.to_object(cfg.data)`` gives a ``DataConfig``)
and the data library takes these objects; each checks its ranges in ``__post_init__`` and raises
``ConfigError`` naming the key, the value and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from bailong.errors import ConfigError, check_choice, check_number, unset


def expect_config(value: Any, cls: type, name: str) -> None:
    """``TypeError`` unless ``value`` is a ``cls``: the data library takes the typed config only, so a dict or a
    DictConfig fails here, at the public function it was passed to, not as a missing attribute deep inside."""
    if not isinstance(value, cls):
        raise TypeError(
            f"{name}: expected a {cls.__module__}.{cls.__name__}, got {type(value).__name__} "
            "(build one, or convert the composed config once: OmegaConf.to_object(cfg.data))"
        )


def _text(key: str, value: Any) -> None:
    if not unset(value) and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{key}={value!r}: expected a non-empty string")


def _format(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None:  # null: told by the file name
        check_choice(key, value, choices)


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
    # documents kept, after conversion and deduplication (data.dedup.engine=datatrove: before near-duplicate removal)
    max_docs: int | None = None
    convert: str | None = None  # OpenCC conversion per document, e.g. s2twp (Simplified -> Taiwan Traditional)
    # fields (jsonl, hub) whose values together decide a document's split instead of its text: documents sharing
    # them share a split, e.g. [title, author] for poems, so the variants of one poem are held out together (a
    # record lacking some of the fields groups by the rest; lacking all of them is an error)
    group_by: list[str] | None = None

    def __post_init__(self) -> None:
        # a list element does not know its index (data.tc.0, eval.mc.tc_sources.1): its path names it
        where = f"corpus path={self.path}"
        _text(f"{where}: path", self.path)
        _format(f"{where}: format", self.format, ("txt", "jsonl", "hub"))
        _text(f"{where}: text_field", self.text_field)
        check_number(f"{where}: max_docs", self.max_docs, lambda v: v >= 1, "null or an integer >= 1", optional=True)
        for name in self.group_by or ():
            _text(f"{where}: group_by", name)


@dataclass
class DedupConfig:
    """Document-level dedup per language, across its corpora, before the split (bailong/data/dedup.py)."""

    exact: bool = True  # hash of the normalised text
    near: float | None = 0.8  # MinHash LSH Jaccard threshold over character shingles; null: exact only
    num_perm: int = 128
    ngram: int = 5  # characters per shingle
    # near-duplicate grouping before the split: a kept document at least this similar (estimated Jaccard) to
    # earlier kept ones goes to their split, so a variant of a held-out text is never trained on (one similar to
    # documents in two splits is dropped: "bridged"); null: each document by the hash of its own text
    group: float | None = None
    # where the near-duplicate index lives: "memory" (datasketch's LSH in the prepare process, first copy wins;
    # about 2.4 KB per kept document) or "datatrove" (its MinHash signature, bucket and cluster stages on disk, in
    # parallel tasks under data.prepare.executor, local or SLURM: flat memory, any corpus size)
    engine: str = "memory"

    def __post_init__(self) -> None:
        check_choice("data.dedup.engine", self.engine, ("memory", "datatrove"))
        if self.engine == "datatrove" and (self.near is None or self.group is not None):
            raise ConfigError(
                f"data.dedup.engine=datatrove with near={self.near}, group={self.group}: expected a near threshold "
                "(datatrove's MinHash stages remove exact copies too) and group null (grouping runs in memory)"
            )
        near = "null (exact only) or a Jaccard threshold in (0, 1]"
        check_number("data.dedup.near", self.near, lambda v: 0 < v <= 1, near, optional=True)
        group = "null (no grouping) or a Jaccard threshold in (0, 1], below data.dedup.near"
        check_number("data.dedup.group", self.group, lambda v: 0 < v <= 1, group, optional=True)
        if self.group is not None and self.near is not None and self.group >= self.near:
            raise ConfigError(
                f"data.dedup.group={self.group}: expected {group} ({self.near}): documents that similar are removed"
            )
        # fewer permutations estimate Jaccard too coarsely for the LSH bands to mean anything
        check_number("data.dedup.num_perm", self.num_perm, lambda v: v >= 16, "an integer >= 16 (128 is usual)")
        check_number("data.dedup.ngram", self.ngram, lambda v: v >= 1, "a positive number of characters per shingle")


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

    def __post_init__(self) -> None:
        where = f"chat corpus path={self.path}"
        _text(f"{where}: path", self.path)
        _format(f"{where}: format", self.format, ("jsonl", "hub"))
        _text(f"{where}: messages_field", self.messages_field)
        check_number(
            f"{where}: max_records", self.max_records, lambda v: v >= 1, "null or an integer >= 1", optional=True
        )


@dataclass
class InstructConfig:
    """The instruction set generated from the Tang poems (bailong/data/instruct.py)."""

    # a corpus of data.tc (by path): the set trains on its prepared train poems and validates on its dev poems
    poems: str = "${paths.data_dir}/zh_tw/poetry_tang.jsonl.gz"
    max_train: int | None = None  # conversations (at most one per poem)
    max_val: int | None = 64
    en_share: float = 0.4  # conversations asked in English
    multi_turn_share: float = 0.3
    system_share: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("en_share", "multi_turn_share", "system_share"):
            check_number(f"data.chat.instruct.{key}", getattr(self, key), lambda v: 0 <= v <= 1, "a number in [0, 1]")
        for key in ("max_train", "max_val"):
            check_number(
                f"data.chat.instruct.{key}",
                getattr(self, key),
                lambda v: v >= 0,
                "null or an integer >= 0",
                optional=True,
            )


@dataclass
class ChatDataConfig:
    instruct: InstructConfig | None = None  # generated Tang-poem set (null: none)
    # chat corpora, split three ways by a hash of each conversation (data.val_fraction, data.test_fraction)
    files: list[ChatCorpusConfig] = field(default_factory=list)
    max_val: int = 64  # held-out conversations per source scored as val/chat_bpc
    packing: bool = True  # whole conversations packed into data.seq_len rows (block-diagonal attention)

    def __post_init__(self) -> None:
        check_number("data.chat.max_val", self.max_val, lambda v: v >= 0, "an integer >= 0")


@dataclass
class SlurmConfig:
    """The SLURM job arrays datatrove submits for the dedup stages (its SlurmPipelineExecutor's arguments)."""

    partition: str | None = None
    time: str = "04:00:00"  # per task
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: str | None = None
    venv_path: str | None = None  # an activate script sourced by each task; null: the submitting environment
    job_name: str = "bailong-dedup"
    sbatch_args: dict[str, str] = field(default_factory=dict)  # more #SBATCH lines, e.g. {account: my-account}
    poll_seconds: int = 60  # how often the prepare process checks whether the arrays finished


@dataclass
class PrepareConfig:
    """How the prepare stage splits its work (bailong/data/prepare.py). ``workers`` and ``batch_docs`` change only
    its speed; the shard sizes change how the same rows are cut into files (and so the cache key)."""

    workers: int = 1  # processes converting, fingerprinting and tokenizing (the index and the writer are one)
    batch_docs: int = 256  # documents per task sent to a worker
    shard_docs: int = 20000  # training documents per text shard: a killed prepare resumes after the last one
    shard_tokens: int = 1 << 24  # tokens per .npy shard (32 MiB of uint16 ids)
    # data.dedup.engine=datatrove: where its stages run ("local": `workers` processes here; "slurm": job arrays,
    # this process waits for them) and how many tasks share each LSH band's bucket stage
    executor: str = "local"
    tasks_per_bucket: int = 1
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        for key in ("workers", "batch_docs", "shard_docs", "shard_tokens", "tasks_per_bucket"):
            check_number(f"data.prepare.{key}", getattr(self, key), lambda v: v >= 1, "an integer >= 1")
        check_choice("data.prepare.executor", self.executor, ("local", "slurm"))
        if self.executor == "slurm" and unset(self.slurm.partition):
            raise ConfigError("data.prepare.executor=slurm: expected data.prepare.slurm.partition (a partition name)")


@dataclass
class DataConfig:
    tc: list[CorpusConfig] = field(default_factory=list)
    en: list[CorpusConfig] = field(default_factory=list)
    tc_ratio: float = 0.8  # share of training tokens that are Traditional Chinese
    val_fraction: float = 0.02  # the dev split: validation during training, every choice made on held-out text
    test_fraction: float = 0.02  # the test split: held out of training and of every choice
    split_seed: int = 0
    # TC training documents the tokenizer and the init strategies' corpus passes learn from: all of them (null), or
    # a seeded uniform sample of this many (a corpus of billions of tokens: training still streams all of it)
    tc_sample_docs: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    num_workers: int = 0
    max_val_chars: int | None = 20000  # per language, so evaluation takes seconds on a CPU
    # removal off by default (the shipped data pack is clean); hub corpora turn it on: {exact: true, near: 0.8}.
    # The default data (conf/data/pretrain_tc.yaml) sets group: 0.4, near-duplicate grouping; a DataConfig built in
    # code does not group unless asked
    dedup: DedupConfig = field(default_factory=lambda: DedupConfig(exact=False, near=None))
    chat: ChatDataConfig | None = None  # SFT stage: the chat data (conf/data/sft_chat.yaml)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        check_number("data.tc_ratio", self.tc_ratio, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        check_number("data.val_fraction", self.val_fraction, lambda v: 0 < v < 1, "a number in (0, 1)")
        check_number("data.test_fraction", self.test_fraction, lambda v: 0 <= v < 1, "a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction}: expected < 1 "
                "(the rest is training text)"
            )
        check_number(
            "data.tc_sample_docs", self.tc_sample_docs, lambda v: v >= 1, "null (all) or an integer >= 1", optional=True
        )
        check_number("data.seq_len", self.seq_len, lambda v: v >= 2, "an integer >= 2")
        check_number("data.batch_size", self.batch_size, lambda v: v >= 1, "an integer >= 1")
        check_number("data.num_workers", self.num_workers, lambda v: v >= 0, "an integer >= 0")
        check_number(
            "data.max_val_chars", self.max_val_chars, lambda v: v >= 1, "null or an integer >= 1", optional=True
        )


def data_config_from_yaml(path: str | os.PathLike, data_dir: str | os.PathLike) -> DataConfig:
    """The ``DataConfig`` of one conf/data/*.yaml file without Hydra (scripts outside run.py, e.g.
    experiments/build_mini_base.py): merged into the schema as Hydra merges it, ``${paths.data_dir}`` set to
    ``data_dir``, range-checked. A file with a Hydra defaults list (``sft_chat``) needs run.py's composition."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(path)
    if "defaults" in raw:
        raise ConfigError(f"{path}: has a defaults list; compose it as run.py does (bailong.config.compose_config)")
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": OmegaConf.merge(DataConfig, raw)})
    return OmegaConf.to_object(cfg.data)
