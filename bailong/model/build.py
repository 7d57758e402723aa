"""Stage 2: the trainable model — load the base, resize, write the new rows, quantise, add LoRA.

Order: resize → initialise new rows → quantise linear layers → peft. The rows are
computed by an init strategy on a full-precision copy of the base (``new_rows``) and written here
into the (possibly 4-bit) model after resizing it. bitsandbytes quantises only ``nn.Linear``
projections and lm_head is skipped, so embeddings and head stay in full precision and writing the
rows after quantising equals "initialise, then quantise".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any
from unittest import mock

import bitsandbytes as bnb
import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from bailong.model.config import FinetuneConfig, LoraConfig, ModelConfig, QuantConfig
from bailong.model.device import local_rank
from bailong.model.lora_dropout import share_dropout_masks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_STORAGE = {**DTYPES, "uint8": torch.uint8}


def is_quantised(quant: QuantConfig | None) -> bool:
    return quant is not None and quant.quantised


def bnb_config(quant: QuantConfig | None) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit NF4 (+ double quantisation) for every linear projection; ``None`` for ``quant.name=none``.

    lm_head is skipped explicitly (transformers skips it by default too, but an explicit
    ``llm_int8_skip_modules`` replaces that default); embeddings are ``nn.Embedding`` and never quantised.
    """
    if not is_quantised(quant):
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        # uint8 packs two 4-bit values per byte; FSDP-QLoRA needs bfloat16 storage to shard with the rest
        bnb_4bit_quant_storage=QUANT_STORAGE[quant.quant_storage],
        llm_int8_skip_modules=list(quant.skip_modules or ["lm_head"]),
    )


def disable_cpu_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns #layers guarded.

    On CPUs with AVX512-BF16, an eval-mode forward under ``no_grad`` repacks each ``Linear4bit`` weight in
    place, and later training steps then run through ``gemv_4bit``, which has no backward: LoRA
    gradients come out silently wrong (about 90% relative error in early layers, measured). Call this before any
    forward pass. The repacking cannot be undone exactly (absmax is rounded to bfloat16), so an already repacked
    layer is an error.
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
    model: ModelConfig, *, quant: QuantConfig | None = None, device: str | torch.device | None = None
) -> PreTrainedModel:
    """The base causal LM ``model.pretrained`` (local directory or hub id) at ``model.revision``, 4-bit when
    ``quant.name == 'nf4'``, repack-guarded; its own Python code runs only if ``model.trust_remote_code``.

    ``model.dtype`` is the dtype of everything not quantised. ``device`` is where the weights load (straight
    there: a 7B base never passes through CPU memory on a GPU run); ``None`` keeps the old default: 4-bit
    models on this rank's GPU when there is one, the rest on the CPU. Like ``from_pretrained`` it returns
    eval mode.
    """
    quant_config = bnb_config(quant)
    storage = None if quant_config is None else quant.quant_storage
    if storage not in (None, "uint8") and storage != model.dtype:  # FSDP-QLoRA: one dtype per unit
        raise ValueError(
            f"quant.quant_storage={storage} needs model.dtype to match "
            f"(got {model.dtype}): FSDP shards a layer's 4-bit and unquantised weights as one dtype"
        )
    loaded = AutoModelForCausalLM.from_pretrained(
        model.pretrained,
        quantization_config=quant_config,
        dtype=DTYPES[model.dtype],
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        use_safetensors=True,  # never unpickle .bin weights
        device_map=rank_device_map(quant_config) if device is None else device_map(device),
        attn_implementation=model.attn_implementation,
    )
    disable_cpu_repack(loaded)
    return loaded


def device_map(device: str | torch.device) -> dict[str, Any] | None:
    """``from_pretrained``'s placement for one device: everything there (``None``, the default, for the CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    return {"": device.index if device.type == "cuda" and device.index is not None else str(device)}


def rank_device_map(quant_config: BitsAndBytesConfig | None) -> dict[str, int] | None:
    """QLoRA on GPUs: the whole 4-bit model on this process's own GPU (``{"": local_rank}``), so under DDP
    every rank quantises and holds its own copy; bitsandbytes quantises while moving to the device.
    ``None`` (load on the CPU) for unquantised models and CPU runs: Lightning moves those itself."""
    if quant_config is None or not torch.cuda.is_available():
        return None
    return {"": local_rank()}


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


def write_rows(
    model: PreTrainedModel, num_base: int, rows: Mapping[str, torch.Tensor], vocab_size: int | None = None
) -> None:
    """Write ``rows['embed']`` / ``rows['head']`` into token ids ``num_base .. vocab_size - 1`` of a resized
    model (``vocab_size``: default, the model's rows; rows past it are padding and stay as they are)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden, vocab = embed.weight.shape[1], vocab_size or embed.weight.shape[0]
    if vocab > embed.weight.shape[0]:
        raise ValueError(
            f"rows for ids {num_base}..{vocab - 1} but the resized model has only "
            f"{embed.weight.shape[0]} embedding rows"
        )
    ids = range(num_base, vocab)  # one contiguous block: written as a slice (a copy, not an indexed scatter)
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
            weight[num_base:vocab] = rows[key].to(device=weight.device, dtype=weight.dtype)


def padded_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (1: unchanged). Matrices whose row count is
    a multiple of 64 map onto tensor-core tiles; 59,241 rows become 59,264."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"model.pad_vocab_to_multiple_of={multiple!r}: expected a positive integer (1: no padding)")
    return -(-vocab_size // multiple) * multiple


def extend_vocabulary(
    model: PreTrainedModel,
    num_base: int,
    vocab_size: int,
    rows: Mapping[str, torch.Tensor] | None,
    pad_to_multiple_of: int = 1,
) -> int:
    """Resize the base's embedding and head to ``vocab_size`` rounded up to ``pad_to_multiple_of``, write
    the new rows by token id and zero the padding rows (no token maps to them, and ``mask_padding_logits``
    keeps them out of every softmax). Returns the padded row count."""
    base_rows = model.get_input_embeddings().weight.shape[0]
    if not 0 < num_base <= base_rows:
        raise ValueError(f"num_base={num_base}: the base model has {base_rows} embedding rows")
    if vocab_size < num_base:
        raise ValueError(f"vocab_size={vocab_size} is smaller than num_base={num_base}: old ids never move")
    if vocab_size > num_base and rows is None:
        raise ValueError(f"rows=None but vocab_size={vocab_size} > num_base={num_base}: new rows are needed")
    padded = padded_size(vocab_size, pad_to_multiple_of)
    if padded == base_rows or (vocab_size == num_base and padded < base_rows):
        return base_rows  # nothing to append, and the base's matrices already have the rows (masked past vocab_size)
    resize_rows(model, padded)
    if vocab_size > num_base:
        write_rows(model, num_base, rows, vocab_size)
    zero_rows(model, vocab_size)
    return padded


def resize_rows(model: PreTrainedModel, rows: int) -> None:
    """``resize_token_embeddings`` to ``rows`` for a caller that writes every appended row itself (the init
    strategies, ``extend_vocabulary``, ``load_adapter``): the appended rows are left as allocated until then.

    Nothing is computed for them: the new ``nn.Embedding``/``nn.Linear`` skip their own init
    (``no_init_weights``), and so does the ``_init_weights`` transformers then calls on them, which
    ``no_init_weights`` does not reach (transformers 5 draws it through its own copy of ``normal_``: 2.6 s of
    draws at Llama-2 shapes on one CPU thread, for rows every caller overwrites). Nothing is drawn from the
    global RNG either, so what is drawn later — LoRA's init, the data order — does not depend on how many rows
    were appended or padded."""
    device = model.get_input_embeddings().weight.device
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        no_init_weights(),
        mock.patch.object(model, "_init_weights", lambda module: None),
    ):
        model.resize_token_embeddings(rows, mean_resizing=False)


def zero_rows(model: PreTrainedModel, start: int) -> None:
    """Zero the embedding and head rows from ``start`` on (a tied matrix once)."""
    with torch.no_grad():
        for weight in {
            id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        }.values():
            weight[start:] = 0


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mask_padding_logits(model: torch.nn.Module, vocab_size: int) -> None:
    """Give the padding rows' logits -inf wherever the model's head computes them, so sampling never draws
    a padding id and every softmax (bits/char, multiple choice, generation) is over the real vocabulary.

    The hook sits on the module the model calls (peft's wrapper, if any). The fused training loss bypasses
    it and slices the weight to ``scored_vocab(model)`` instead (``bailong.train.loss``).
    """
    head = transformers_model(model).get_output_embeddings()
    rows = _base_weight_rows(head)
    model.bailong_scored_vocab = vocab_size
    if rows <= vocab_size:
        return

    def mask(module, args, logits):
        return logits.index_fill(-1, torch.arange(vocab_size, logits.shape[-1], device=logits.device), float("-inf"))

    head.register_forward_hook(mask)


def _base_weight_rows(head: torch.nn.Module) -> int:
    while not isinstance(getattr(head, "weight", None), torch.Tensor):  # peft wrappers keep the layer inside
        head = getattr(head, "original_module", None) or head.get_base_layer()
    return head.weight.shape[0]


def scored_vocab(model: torch.nn.Module) -> int:
    """The rows of the head that stand for tokens: the tokenizer's size, not the padded matrix's."""
    return getattr(model, "bailong_scored_vocab", None) or model.config.vocab_size


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """The leaf names of every linear projection of ``model`` but its output head (``q_proj``, ``c_attn``, ...):
    what ``lora.target_modules=all-linear`` targets. nn.Linear, its 4-bit form and GPT-2's Conv1D count."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    kinds = (torch.nn.Linear, bnb.nn.Linear4bit, Conv1D)
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds) and m is not head and n}
    )


def lora_config(model: PreTrainedModel, lora: LoraConfig, new_ids: list[int]) -> peft.LoraConfig:
    """peft's LoraConfig for the ``lora`` settings, after checking its targets against ``model``."""
    embeddings = lora.embeddings
    targets = linear_module_names(model) if lora.all_linear else list(lora.target_modules)
    if not targets:
        raise ValueError(f"lora.target_modules=all-linear: {type(model).__name__} has no linear layer but its head")
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} match no module of {type(model).__name__}")

    embed = module_name(model, model.get_input_embeddings())
    head = module_name(model, model.get_output_embeddings())
    extra: dict[str, Any] = {}
    if embeddings == "new_rows" and new_ids:  # peft trains only these rows of both matrices
        extra["trainable_token_indices"] = {embed: list(new_ids), head: list(new_ids)}
    elif embeddings == "full":  # whole matrices: large adapters
        extra["modules_to_save"] = [embed, head]
    elif embeddings == "lora":  # low-rank updates of embedding and head, as the paper describes
        targets += [embed, head]
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        target_modules=targets,
        task_type="CAUSAL_LM",
        **extra,
    )


def build_model(
    base: ModelConfig,
    *,
    vocab_size: int,
    num_base: int,
    rows: Mapping[str, torch.Tensor] | None,
    quant: QuantConfig | None,
    lora: LoraConfig | None,
    finetune: FinetuneConfig | None = None,
    gradient_checkpointing: bool = False,
    device: str | torch.device | None = None,
) -> peft.PeftModel:
    """The model to train: ``base`` (4-bit if ``quant.name == 'nf4'``) loaded on ``device``, resized to
    ``vocab_size`` (rounded up to ``base.pad_vocab_to_multiple_of`` rows), new rows written by token id, LoRA per
    ``lora``; in train mode, repack-guarded.

    ``finetune.name == 'full'``: full fine-tuning on the same base, resized and with the same rows, unquantised,
    every parameter trainable, no peft, ``lora`` ignored; the transformers model itself is returned."""
    full = is_full_finetuning(finetune or FinetuneConfig(), quant)
    if not full and lora is None:
        raise ValueError("build_model: lora settings are needed unless finetune.name=full")
    model = load_base_model(base, quant=quant, device=device)
    padded_vocab = extend_vocabulary(model, num_base, vocab_size, rows, base.pad_vocab_to_multiple_of)
    # what save_adapter records so load_adapter can rebuild the same base
    build = {
        "pretrained": base.pretrained,
        "revision": base.revision,
        "trust_remote_code": base.trust_remote_code,
        "dtype": base.dtype,
        "quant": None if quant is None else asdict(quant),
        "vocab_size": vocab_size,
        "num_base": num_base,
        "padded_vocab_size": padded_vocab,
        "attn_implementation": base.attn_implementation,
    }

    checkpoint_kwargs = {"use_reentrant": False}  # no need for input grads; works with frozen embeddings
    if is_quantised(quant):
        # freezes the base, upcasts non-4-bit params to fp32, optionally turns on checkpointing
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpoint_kwargs
        )
    elif gradient_checkpointing:  # activation_checkpointing_enable is transformers >= 5.23; older 5.x: gradient_*
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)

    if full:  # every weight trains: no peft (4-bit weights were refused above)
        model = train_every_weight(model, build)
        mask_padding_logits(model, vocab_size)
        return model
    config = lora_config(model, lora, list(range(num_base, vocab_size)))
    model = peft.get_peft_model(model, config)
    if lora.shared_dropout_mask:
        share_dropout_masks(model)
    model.train()  # from_pretrained returned eval mode and Lightning keeps modules as they are
    disable_cpu_repack(model)
    mask_padding_logits(model, vocab_size)
    keep_base_in_model_dtype(model, quant, base.dtype)
    match_quant_storage(model, quant)
    model.bailong_build = {**build, "embeddings": lora.embeddings}
    return model


ADAPTER_MARKERS = ("lora_", "trainable_tokens_", "modules_to_save.")  # peft's names for what an adapter adds


def keep_base_in_model_dtype(model: torch.nn.Module, quant: QuantConfig | None, dtype: str) -> None:
    """The base's own unquantised weights (embeddings, head, norms) back in ``model.dtype`` after
    ``prepare_model_for_kbit_training`` upcast them to float32.

    The upcast gives weights that *train* a float32 master copy; the base's own weights never train (the new rows
    train as peft's float32 deltas beside them, LoRA in float32), so a copy buys nothing. With ``model.dtype:
    bfloat16`` this halves their memory (1 GB at Llama-2-7B's 59k rows) and keeps the residual stream in bfloat16
    between the 4-bit layers, which compute in bfloat16: no float32 <-> bfloat16 casts around every projection.
    A no-op for float32 bases and for FSDP storage, which ``match_quant_storage`` sets."""
    if not is_quantised(quant) or quant.quant_storage != "uint8" or DTYPES[dtype] == torch.float32:
        return
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit) or not p.is_floating_point() or any(m in name for m in ADAPTER_MARKERS):
            continue
        p.data = p.data.to(DTYPES[dtype])


MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")  # trainer.precision values that run the model under autocast


def follow_autocast(model: torch.nn.Module, precision: str | int) -> None:
    """Under autocast (``trainer.precision`` bf16-mixed or 16-mixed) LoRA layers take their input as it comes
    (peft's ``cast_input_dtype_enabled`` off): peft would cast each input to the adapter's float32 and autocast
    cast it straight back, two copies of every projection's input for nothing. Set for the whole fit, not per
    step, because gradient checkpointing recomputes the forward during backward and it must cast alike; every
    forward of a mixed-precision run (training, validation, the evaluations) runs under autocast."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = str(precision) not in MIXED_PRECISIONS


def match_quant_storage(model: torch.nn.Module, quant: QuantConfig | None) -> None:
    """FSDP-QLoRA (``quant.quant_storage`` a float dtype): undo ``prepare_model_for_kbit_training``'s fp32 upcast,
    so every parameter of a unit has the storage dtype FSDP flattens it into; a no-op for uint8 storage."""
    storage = quant.quant_storage if is_quantised(quant) else "uint8"
    if storage == "uint8":
        return
    for p in model.parameters():
        if not isinstance(p, bnb.nn.Params4bit) and p.is_floating_point():
            p.data = p.data.to(QUANT_STORAGE[storage])


def is_full_finetuning(finetune: FinetuneConfig, quant: QuantConfig | None) -> bool:
    """Whether ``finetune`` asks for full fine-tuning; refuses it with 4-bit weights, which cannot train."""
    if finetune.full and is_quantised(quant):
        raise ValueError(
            "finetune.name=full with quant.name=nf4: full fine-tuning updates every weight and 4-bit "
            "weights cannot be trained; use quant=none (finetune=full selects it unless quant=nf4 is "
            "also given)"
        )
    return finetune.full


def train_every_weight(model: PreTrainedModel, build: dict) -> PreTrainedModel:
    """Full fine-tuning: every parameter of the resized, unquantised base trainable, in train mode, with the
    build record save_adapter needs (``finetune: full``: it saves the whole model, not an adapter)."""
    model.requires_grad_(True)
    model.train()  # from_pretrained returned eval mode and Lightning keeps modules as they are
    model.bailong_build = {**build, "embeddings": None, "finetune": "full"}  # lora.embeddings has no meaning here
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters; a 4-bit weight counts as the matrix it stands for, not its packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.quant_state.shape.numel() if isinstance(p, bnb.nn.Params4bit) else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}
