"""The model's configuration: which base, its quantisation, what trains (LoRA or every weight).

These dataclasses are the schema Hydra checks overrides against (``model``, ``quant``, ``lora``, ``finetune``)
and the typed objects the stages pass into ``bailong.model``."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


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
