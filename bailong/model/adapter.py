"""Save a trained adapter so it reloads onto a fresh base and gives the same logits.

A fresh base lacks three things: the tokenizer, the values of the appended rows and the settings
that built the model. peft stores the LoRA matrices and, in the ``new_rows`` and ``full`` modes,
the embedding values it trains (trainable-token rows, whole saved modules). In the ``lora`` and
``frozen`` modes the appended rows are frozen initial values peft does not store: those go to
``new_rows.safetensors``. peft's own fallback (``save_embedding_layers``) would store both whole
matrices instead, so it is turned off.

Layout of ``out_dir``::

    adapter_config.json, adapter_model.safetensors   peft
    new_rows.safetensors                             lora / frozen modes only
    tokenizer files                                  tokenizer.save_pretrained
    tokenizer.model                                  the SentencePiece model the tokenizer was loaded with
    bailong_adapter.json                             build settings load_adapter needs
    config.yaml                                      the resolved experiment config, for the record

A full fine-tuning model (``finetune=full``: no peft, every weight trained) is saved whole instead: the
directory is a standalone Hugging Face model (``model.safetensors``, ``config.json``, the tokenizer) plus
``bailong_adapter.json`` (the build record) and ``config.yaml``, and ``load_adapter`` loads it as a base.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from bailong.model.build import (
    disable_cpu_repack,
    is_quantised,
    keep_base_in_model_dtype,
    load_base_model,
    mask_padding_logits,
    match_quant_storage,
    resize_rows,
    write_rows,
    zero_rows,
)
from bailong.model.config import ModelConfig, QuantConfig, RandomBaseConfig
from bailong.model.random_base import ensure_random_base
from bailong.run_files import ADAPTER_DIR
from bailong.tokenization import SP_MODEL_FILE, sentencepiece_matches

META_FILE = "bailong_adapter.json"
ROWS_FILE = "new_rows.safetensors"
CONFIG_FILE = "config.yaml"
ROWS_STORED_BY_US = ("lora", "frozen")  # modes where peft does not store the appended rows


def _base_weight(model: peft.PeftModel, module: torch.nn.Module) -> torch.Tensor:
    """The frozen matrix under peft's wrappers (LoRA layer, trainable tokens, modules to save)."""
    while True:
        if isinstance(module, peft.utils.other.AuxiliaryTrainingWrapper):
            module = module.original_module
        elif isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            module = module.get_base_layer()
        else:
            return module.weight


def stored_rows(model: peft.PeftModel, num_base: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """The appended token rows ``num_base .. vocab_size - 1`` of the frozen embedding and head of a peft
    model (the zero padding rows past them are not the tokenizer's)."""
    base = model.get_base_model()
    embed = _base_weight(model, base.get_input_embeddings())
    head = _base_weight(model, base.get_output_embeddings())
    rows = {"embed": embed[num_base:vocab_size].detach().clone()}
    if head is not embed:
        rows["head"] = head[num_base:vocab_size].detach().clone()
    return rows


def save_adapter(
    model: peft.PeftModel,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    rows: Mapping[str, torch.Tensor] | None = None,
    config: Mapping | None = None,
) -> Path:
    """Write the adapter, the appended rows peft does not store, the tokenizer and the config to ``out_dir``.

    ``rows`` are the initial rows given to ``build_model``; in the modes where they are stored they must
    still equal the model's frozen rows (a mismatch means the file would not reproduce the model).
    """
    build = getattr(model, "bailong_build", None)
    if build is None:
        raise ValueError("save_adapter needs a model made by bailong.model.build.build_model (no bailong_build)")
    if len(tokenizer) > build["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {build['vocab_size']} embedding rows"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if build.get("finetune") == "full":  # every weight trained: the whole model, loadable by from_pretrained alone
        model.save_pretrained(out)  # safetensors (transformers 5 writes no other format)
    else:
        model.save_pretrained(out, save_embedding_layers=False)

    num_base, files = build["num_base"], {}
    if build["embeddings"] in ROWS_STORED_BY_US and build["vocab_size"] > num_base:
        frozen = stored_rows(model, num_base, build["vocab_size"])
        for key, value in (rows or {}).items():
            if key in frozen and not torch.equal(value.to(frozen[key].dtype), frozen[key]):
                raise ValueError(f"rows[{key!r}] differs from the model's frozen appended rows: wrong rows passed?")
        save_file({k: v.contiguous() for k, v in frozen.items()}, str(out / ROWS_FILE))
        files["rows"] = ROWS_FILE
    tokenizer.save_pretrained(out)
    # transformers writes no tokenizer.model for a fast tokenizer; the export (and llama.cpp through it) needs it
    sp_model = Path(getattr(tokenizer, "name_or_path", "") or ".") / SP_MODEL_FILE
    if sp_model.resolve() != (out / SP_MODEL_FILE).resolve() and sentencepiece_matches(tokenizer, sp_model):
        shutil.copyfile(sp_model, out / SP_MODEL_FILE)
    meta = {"format": 1, "build": build, "files": files}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    if config is not None:
        (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(dict(config))))
    return out


def find_adapter(path: str | Path) -> Path | None:
    """The adapter directory of a run directory (``<run>/adapter``) or an adapter directory itself; None if
    ``path`` is neither (e.g. a base or an exported model directory)."""
    path = Path(path)
    return next((d for d in (path / ADAPTER_DIR, path) if (d / META_FILE).is_file()), None)


def check_remote_code(path: Path, build: Mapping, trust_remote_code: bool) -> None:
    """Refuse an adapter whose base runs its own Python code unless the *user* allowed it.

    ``bailong_adapter.json`` records whether the base was loaded with ``trust_remote_code``, but an adapter
    directory is often someone else's download: what it says may never turn remote code on. Only the
    caller's ``trust_remote_code`` (a command-line flag or the user's config) does."""
    if build.get("trust_remote_code") and not trust_remote_code:
        raise PermissionError(
            f"{path / META_FILE}: this adapter was built on a base loaded with trust_remote_code=True "
            f"({build.get('pretrained')!r}), which runs Python code that comes with the model. bailong never runs it "
            "because a downloaded file asks: read that code, then pass --trust-remote-code (python -m bailong.chat, "
            "python -m bailong.eval, python -m bailong.export) or set model.trust_remote_code=true (sft.from_run)"
        )


def read_meta(path: Path) -> dict:
    """``bailong_adapter.json`` of an adapter directory, checked for the keys ``load_adapter`` reads."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: no {META_FILE}; not a directory written by save_adapter")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from None
    build = meta.get("build") if isinstance(meta, dict) else None
    missing = [
        k
        for k in ("pretrained", "quant", "dtype", "num_base", "vocab_size")
        if not isinstance(build, dict) or k not in build
    ]
    if missing or not isinstance(meta.get("files", {}), dict):
        raise ValueError(
            f'{meta_file}: expected {{"build": {{...}}, "files": {{...}}}} with build keys '
            f"pretrained, quant, dtype, num_base, vocab_size; missing {missing or 'files'}"
        )
    return meta


def load_adapter(
    adapter_dir: str | Path,
    *,
    pretrained: str | None = None,
    quant: QuantConfig | None = None,
    dtype: str | None = None,
    is_trainable: bool = False,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[peft.PeftModel, Any]:
    """Rebuild a saved adapter on a fresh base: ``(model, tokenizer)``; eval mode unless ``is_trainable``.

    ``pretrained``, ``quant`` and ``dtype`` default to what the adapter was built with (a moved base
    directory or a different quantisation can be given here). ``trust_remote_code`` is the caller's own
    consent to run a base's Python code; the adapter's record of it only ever makes loading refuse
    (``check_remote_code``).
    """
    path = Path(adapter_dir)
    meta = read_meta(path)
    build = meta["build"]
    check_remote_code(path, build, trust_remote_code)
    trust_remote_code = bool(build.get("trust_remote_code")) and trust_remote_code  # what the base needs, if allowed
    quant = quant if quant is not None else built_quant(build)
    if build.get("finetune") == "full":
        return _load_full_model(
            path,
            build,
            quant=quant,
            dtype=dtype,
            is_trainable=is_trainable,
            device=device,
            trust_remote_code=trust_remote_code,
        )
    base = built_base(build, pretrained=pretrained, dtype=dtype, trust_remote_code=trust_remote_code)
    if base.random_base is not None:  # trained on a random real-width base: rebuilt if missing
        ensure_random_base(base)
    model = load_base_model(base, quant=quant, device=device)
    num_base, vocab_size = build["num_base"], build["vocab_size"]
    rows_in_model = build.get("padded_vocab_size", vocab_size)  # adapters saved before padding existed: unpadded
    if rows_in_model != num_base:
        resize_rows(model, rows_in_model)  # every appended row is overwritten: by peft's stored values or new_rows
        zero_rows(model, num_base)
    if "rows" in meta["files"]:
        rows = load_file(str(path / meta["files"]["rows"]))
        write_rows(model, num_base, rows, vocab_size)
    if is_quantised(quant):  # as build_model did: unquantised parts upcast to fp32, so the logits match
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # new_rows / full modes: the resized rows stay as random placeholders; peft's stored values replace them
    model = peft.PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)
    keep_base_in_model_dtype(model, quant, base.dtype)  # as build_model left it
    match_quant_storage(model, quant)  # as build_model left it: FSDP-QLoRA trained every parameter in bf16
    model.train(is_trainable)
    disable_cpu_repack(model)
    mask_padding_logits(model, vocab_size)
    model.bailong_build = build
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer


def _load_full_model(
    path: Path,
    build: dict,
    *,
    quant: QuantConfig | None,
    dtype: str | None,
    is_trainable: bool,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """A full fine-tuning run's directory is a whole model: loaded as a base is (no peft; 4-bit if ``quant``
    asks, for evaluation only), with its build record; eval mode and frozen unless ``is_trainable``."""
    if is_trainable and is_quantised(quant):
        raise ValueError(f"{path}: a full fine-tuning model reloaded with quant.name=nf4 cannot train; use quant none")
    whole = built_base(build, pretrained=str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    model = load_base_model(whole, quant=quant, device=device)
    mask_padding_logits(model, build["vocab_size"])  # padding rows past the tokenizer: -inf, as build_model set
    model.requires_grad_(is_trainable)
    model.train(is_trainable)
    model.bailong_build = build
    return model, AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def built_quant(build: dict) -> QuantConfig | None:
    """The quantisation an adapter was trained under, from its build record (None: unquantised, old records)."""
    recorded = build.get("quant")
    if not recorded:
        return None
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    return QuantConfig(**{k: v for k, v in recorded.items() if k in known})


def built_base(
    build: dict, *, pretrained: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> ModelConfig:
    """The base an adapter was built on, from its build record; ``pretrained``/``dtype`` replace the recorded
    ones (a moved base, another dtype). ``trust_remote_code`` is the caller's, never the record's."""
    random_base = build.get("random_base")
    return ModelConfig(
        name=Path(pretrained or build["pretrained"]).name,
        pretrained=pretrained or build["pretrained"],
        revision=None if pretrained else build.get("revision"),
        dtype=dtype or build["dtype"],
        trust_remote_code=trust_remote_code,
        attn_implementation=build.get("attn_implementation", "sdpa"),
        random_base=None if pretrained or not random_base else RandomBaseConfig(**random_base),
    )
