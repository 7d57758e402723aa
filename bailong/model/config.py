"""The model's configuration: which base, its quantisation, what trains (LoRA or every weight).

These dataclasses are the schema Hydra checks overrides against (``model``, ``quant``, ``lora``, ``finetune``)
and the typed objects the stages pass into ``bailong.model``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from bailong.errors import ConfigError, check_choice, check_number, unset

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by name: bailong.model.build.DTYPES
QUANT_NAMES = ("nf4", "none")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
# transformers' attention kernels: sdpa (torch's fused attention), eager (the reference loop),
# flash_attention_2 (needs the flash-attn package and a GPU); None lets transformers choose
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", None)
# LoRA on every attention and MLP projection of a Llama block (QLoRA's recipe): the one list of default targets
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# lora.target_modules=all-linear (peft's name for it): every linear projection of the base except the output head,
# whatever the architecture calls them (bailong.model.build.linear_module_names)
ALL_LINEAR = "all-linear"
EMBEDDING_MODES = ("new_rows", "full", "lora", "frozen")
FINETUNE_MODES = ("lora", "full")  # conf/finetune/: LoRA on a frozen (4-bit) base, or every weight


@dataclass
class RandomBaseConfig:
    """A base with a real model's shapes and seeded random weights, built at ``model.pretrained`` when
    missing (bailong/model/random_base.py): real widths without downloading weights."""

    architecture: str = "llama2_7b"  # a name in bailong.model.random_base.ARCHITECTURES
    num_layers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("model.random_base.num_layers", self.num_layers, lambda v: v >= 1, "a positive integer")
        check_number("model.random_base.seed", self.seed, lambda v: v >= 0, "a non-negative integer")


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

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPE_NAMES)
        check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        check_number("model.max_seq_len", self.max_seq_len, lambda v: v >= 2, "an integer >= 2")
        check_number(
            "model.pad_vocab_to_multiple_of",
            self.pad_vocab_to_multiple_of,
            lambda v: isinstance(v, int) and v >= 1,
            "a positive integer (1: no padding, 64: tensor-core shapes)",
        )


@dataclass
class QuantConfig:
    name: str = "nf4"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # kept out of quantisation

    def __post_init__(self) -> None:
        check_choice("quant.name", self.name, QUANT_NAMES)
        check_choice("quant.quant_type", self.quant_type, QUANT_TYPES)
        check_choice("quant.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("quant.quant_storage", self.quant_storage, QUANT_STORAGE)

    @property
    def quantised(self) -> bool:
        """Whether the base's linear layers load in 4 bits."""
        return self.name == "nf4"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # one dropout mask per input: q/k/v share one, gate/up another (bailong/model/lora_dropout.py); peft's default
    # draws one per projection
    shared_dropout_mask: bool = False
    # module names (a list) or ALL_LINEAR; typed Any because OmegaConf 2.3 has no str | list[str]
    target_modules: Any = field(default_factory=lambda: list(LORA_TARGETS))
    embeddings: str = "new_rows"  # new_rows | full | lora | frozen
    use_rslora: bool = False  # rank-stabilised LoRA: updates scaled by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # DoRA: a trained magnitude per output row on top of the low-rank direction update

    def __post_init__(self) -> None:
        check_number(
            "lora.r", self.r, lambda v: isinstance(v, int) and v > 0, "a positive integer: the LoRA rank (8, 16, 64)"
        )
        check_number("lora.alpha", self.alpha, lambda v: v > 0, "a positive number")
        check_number("lora.dropout", self.dropout, lambda v: 0 <= v < 1, "a number in [0, 1)")
        check_choice("lora.embeddings", self.embeddings, EMBEDDING_MODES)
        targets = self.target_modules
        if unset(targets):
            return
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise ConfigError(
                    f"lora.target_modules={targets!r}: expected a list of module names (e.g. [q_proj,v_proj]) "
                    f"or {ALL_LINEAR!r}"
                )
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"lora.target_modules={list(targets)!r}: expected at least one module name (e.g. q_proj, v_proj) "
                f"or {ALL_LINEAR!r}"
            )

    @property
    def all_linear(self) -> bool:
        """Whether LoRA targets every linear projection (``target_modules=all-linear``)."""
        return self.target_modules == ALL_LINEAR


@dataclass
class FinetuneConfig:
    """What trains (conf/finetune/): ``lora`` (default) per ``lora.*`` on a frozen (4-bit) base, or ``full``:
    every weight of the resized base, no LoRA, no quantisation (``lora.*`` ignored)."""

    name: str = "lora"  # lora | full

    def __post_init__(self) -> None:
        check_choice("finetune.name", self.name, FINETUNE_MODES)

    @property
    def full(self) -> bool:
        return self.name == "full"
