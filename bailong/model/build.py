"""Stage 2: the trainable model — load the base, resize, write the new rows, quantise, add LoRA.

Order (DESIGN.md): resize → initialise new rows → quantise linear layers → peft. The rows are
computed by an init strategy on a full-precision copy of the base (``new_rows``) and written here
into the (possibly 4-bit) model after resizing it. bitsandbytes quantises only ``nn.Linear``
projections and lm_head is skipped, so embeddings and head stay in full precision and writing the
rows after quantising equals "initialise, then quantise".
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import bitsandbytes as bnb
import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_STORAGE = {**DTYPES, "uint8": torch.uint8}
EMBEDDING_MODES = ("new_rows", "full", "lora", "frozen")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _field(obj: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a dict, a DictConfig or a plain object."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _dtype(name: str, key: str, table: dict = DTYPES) -> torch.dtype:
    if name not in table:
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(table)}")
    return table[name]


def is_quantised(quant: Any) -> bool:
    if quant is None:
        return False
    name = _field(quant, "name")
    if name not in ("nf4", "none"):
        raise ValueError(f"quant.name={name!r}: expected nf4 or none")
    return name == "nf4"


def bnb_config(quant: Any) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit NF4 (+ double quantisation) for every linear projection; ``None`` for ``quant.name=none``.

    lm_head is skipped explicitly (transformers skips it by default too, but an explicit
    ``llm_int8_skip_modules`` replaces that default); embeddings are ``nn.Embedding`` and never quantised.
    """
    if not is_quantised(quant):
        return None
    quant_type = _field(quant, "quant_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant.quant_type={quant_type!r}: expected nf4 or fp4")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=bool(_field(quant, "double_quant", True)),
        bnb_4bit_compute_dtype=_dtype(_field(quant, "compute_dtype", "bfloat16"), "quant.compute_dtype"),
        # uint8 packs two 4-bit values per byte; FSDP-QLoRA needs bfloat16 storage to shard with the rest
        bnb_4bit_quant_storage=_dtype(_field(quant, "quant_storage", "uint8"), "quant.quant_storage", QUANT_STORAGE),
        llm_int8_skip_modules=list(_field(quant, "skip_modules", None) or ["lm_head"]),
    )


def disable_cpu_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns #layers guarded.

    On CPUs with AVX512-BF16, an eval-mode forward under ``no_grad`` repacks each ``Linear4bit`` weight in
    place, and later training steps then run through ``gemv_4bit``, which has no backward: LoRA
    gradients come out silently wrong (STACK_NOTES). Call this before any forward pass. The repacking
    cannot be undone exactly (absmax is rounded to bfloat16), so an already repacked layer is an error.
    """
    guarded = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"{name}: 4-bit weight was already repacked for CPU inference by an eval/no_grad forward; "
                "call disable_cpu_repack right after loading, before any forward pass"
            )
        module.support_avx512bf16_for_cpu = False
        guarded += 1
    return guarded


def load_base_model(
    pretrained: str,
    *,
    quant: Any = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The base causal LM (local directory or hub id), 4-bit when ``quant.name == 'nf4'``, repack-guarded.

    ``dtype`` is the dtype of everything not quantised. Like ``from_pretrained`` it returns eval mode.
    """
    quant_config = bnb_config(quant)
    if quant_config is not None and quant_config.bnb_4bit_quant_storage != torch.uint8:
        if quant_config.bnb_4bit_quant_storage != _dtype(dtype, "model.dtype"):  # FSDP-QLoRA: one dtype per unit
            raise ValueError(f"quant.quant_storage={_field(quant, 'quant_storage')} needs model.dtype to match "
                             f"(got {dtype}): FSDP shards a layer's 4-bit and unquantised weights as one dtype")
    model = AutoModelForCausalLM.from_pretrained(
        pretrained,
        quantization_config=quant_config,
        dtype=_dtype(dtype, "model.dtype"),
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never unpickle .bin weights
        device_map=rank_device_map(quant_config),
    )
    disable_cpu_repack(model)
    return model


def rank_device_map(quant_config: BitsAndBytesConfig | None) -> dict[str, int] | None:
    """QLoRA on GPUs: the whole 4-bit model on this process's own GPU (``{"": local_rank}``), so under DDP
    every rank quantises and holds its own copy; bitsandbytes quantises while moving to the device.
    ``None`` (load on the CPU) for unquantised models and CPU runs: Lightning moves those itself."""
    if quant_config is None or not torch.cuda.is_available():
        return None
    # LOCAL_RANK: Lightning's launcher and torchrun; SLURM_LOCALID: srun starts every rank itself
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return {"": local_rank}


def new_rows(model: PreTrainedModel, num_base: int) -> dict[str, torch.Tensor]:
    """Copies of the rows past ``num_base`` of the input embedding and the output head."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM")
    w_in, w_out = model.get_input_embeddings().weight, head.weight
    if not 0 <= num_base <= w_in.shape[0]:
        raise ValueError(f"num_base={num_base}: outside the model's {w_in.shape[0]} embedding rows")
    return {"embed": w_in[num_base:].detach().clone(), "head": w_out[num_base:].detach().clone()}


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def write_rows(model: PreTrainedModel, num_base: int, rows: Mapping[str, torch.Tensor]) -> None:
    """Write ``rows['embed']`` / ``rows['head']`` into token ids ``num_base ...`` of a resized model."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab, hidden = embed.weight.shape
    ids = torch.arange(num_base, vocab)
    targets = [("embed", embed.weight)]
    if head.weight is not embed.weight:  # tied weights: one matrix, written once
        targets.append(("head", head.weight))
    elif "head" in rows and not torch.equal(rows["head"], rows["embed"]):
        raise ValueError("the model ties lm_head to the input embedding but rows['head'] != rows['embed']")
    for key, weight in targets:
        if key not in rows:
            raise ValueError(f"rows is missing {key!r}: expected keys 'embed' and 'head'")
        if tuple(rows[key].shape) != (len(ids), hidden):
            raise ValueError(
                f"rows[{key!r}] has shape {tuple(rows[key].shape)}; the resized model needs "
                f"({len(ids)}, {hidden}) = (vocab_size {vocab} - num_base {num_base}, hidden size)"
            )
        with torch.no_grad():
            weight[ids] = rows[key].to(device=weight.device, dtype=weight.dtype)


def check_lora(lora: Any) -> tuple[int, float, float, str]:
    """``(r, alpha, dropout, embeddings)`` after range checks, before any model is loaded."""
    r, alpha, dropout = _field(lora, "r", 16), _field(lora, "alpha", 32), _field(lora, "dropout", 0.05)
    embeddings = _field(lora, "embeddings", "new_rows")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora.r={r!r}: the LoRA rank must be a positive integer (e.g. 8, 16, 64)")
    if not alpha > 0:
        raise ValueError(f"lora.alpha={alpha!r}: must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout={dropout!r}: must be in [0, 1)")
    if embeddings not in EMBEDDING_MODES:
        raise ValueError(f"lora.embeddings={embeddings!r}: expected one of {', '.join(EMBEDDING_MODES)}")
    return r, alpha, dropout, embeddings


def lora_config(model: PreTrainedModel, lora: Any, new_ids: list[int]) -> peft.LoraConfig:
    """peft's LoraConfig for the ``lora`` settings, after checking them against ``model``."""
    r, alpha, dropout, embeddings = check_lora(lora)
    targets = list(_field(lora, "target_modules", None) or DEFAULT_TARGETS)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} match no module of {type(model).__name__}")

    embed = module_name(model, model.get_input_embeddings())
    head = module_name(model, model.get_output_embeddings())
    extra: dict[str, Any] = {}
    if embeddings == "new_rows" and new_ids:  # peft trains only these rows of both matrices
        extra["trainable_token_indices"] = {embed: list(new_ids), head: list(new_ids)}
    elif embeddings == "full":  # whole matrices: large adapters (STYLE.md)
        extra["modules_to_save"] = [embed, head]
    elif embeddings == "lora":  # low-rank updates of embedding and head, as the paper describes
        targets += [embed, head]
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM", **extra
    )


def build_model(
    pretrained: str,
    *,
    vocab_size: int,
    num_base: int,
    rows: Mapping[str, torch.Tensor] | None,
    quant: Any,
    lora: Any,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> peft.PeftModel:
    """The model to train: base (4-bit if ``quant.name == 'nf4'``) resized to ``vocab_size``, new rows
    written by token id, LoRA per ``lora``; in train mode, repack-guarded."""
    check_lora(lora)  # fail before minutes of loading
    model = load_base_model(pretrained, quant=quant, dtype=dtype, revision=revision,
                            trust_remote_code=trust_remote_code)
    base_rows = model.get_input_embeddings().weight.shape[0]
    if not 0 < num_base <= base_rows:
        raise ValueError(f"num_base={num_base}: the base model has {base_rows} embedding rows")
    if vocab_size < num_base:
        raise ValueError(f"vocab_size={vocab_size} is smaller than num_base={num_base}: old ids never move")
    if vocab_size > num_base:
        if rows is None:
            raise ValueError(f"rows=None but vocab_size={vocab_size} > num_base={num_base}: new rows are needed")
        # mean_resizing off: every new row is written below by the chosen init strategy
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        write_rows(model, num_base, rows)

    checkpoint_kwargs = {"use_reentrant": False}  # no need for input grads; works with frozen embeddings
    if is_quantised(quant):
        # freezes the base, upcasts non-4-bit params to fp32, optionally turns on checkpointing
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpoint_kwargs
        )
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)

    config = lora_config(model, lora, list(range(num_base, vocab_size)))
    model = peft.get_peft_model(model, config)
    model.train()  # from_pretrained returned eval mode and Lightning keeps modules as they are
    disable_cpu_repack(model)
    storage = _field(quant, "quant_storage", "uint8") if is_quantised(quant) else "uint8"
    if storage != "uint8":  # FSDP-QLoRA: undo prepare_model_for_kbit_training's fp32 upcast (one dtype per unit)
        for p in model.parameters():
            if not isinstance(p, bnb.nn.Params4bit) and p.is_floating_point():
                p.data = p.data.to(QUANT_STORAGE[storage])
    # what save_adapter records so load_adapter can rebuild the same base
    model.bailong_build = {
        "pretrained": pretrained, "revision": revision, "trust_remote_code": trust_remote_code, "dtype": dtype,
        "quant": _plain(quant), "vocab_size": vocab_size, "num_base": num_base,
        "embeddings": _field(lora, "embeddings", "new_rows"),
    }
    return model


def _plain(obj: Any) -> dict | None:
    """A JSON-able copy of a config object (dict, DictConfig or dataclass-like)."""
    if obj is None:
        return None
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(obj, Mapping):
        return dict(obj)
    return dict(vars(obj))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters; a 4-bit weight counts as the matrix it stands for, not its packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.quant_state.shape.numel() if isinstance(p, bnb.nn.Params4bit) else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}
