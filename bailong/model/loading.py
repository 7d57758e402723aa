"""Loading a model for inference: a run or adapter directory, a base model, or an exported (merged) model.

The evaluation CLI (``python -m bailong.eval``), the chat CLI and the export load through here, with the
command-line options they share (``DEVICE_CHOICES``, ``DEVICE_HELP``, ``TRUST_REMOTE_CODE_HELP``,
``QUANT_CHOICES``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bailong.model.config import DTYPE_NAMES, ModelConfig, QuantConfig

DEVICE_CHOICES = ("auto", "cpu", "gpu", "cuda", "mps")  # as trainer.accelerator
DEVICE_HELP = "where the model runs (auto: this process's GPU when there is one, else the CPU)"
TRUST_REMOTE_CODE_HELP = (
    "run the Python code a base model ships with (transformers' trust_remote_code); never "
    "turned on by what a run or adapter directory says. Read that code first"
)
QUANT_CHOICES = ("nf4", "none")
QUANT_HELP = "quantisation of a base model (a run or adapter loads as it was trained)"


def base_tokenizer(pretrained: str, cache_dir: str | Path | None = None) -> Any:
    """The base's tokenizer exactly as runs build it for their ``base/*`` metrics (``added_vocab=0``), cached
    under ``cache_dir`` (default: ``bailong.cache.default_cache_dir()``)."""
    from bailong.cache import default_cache_dir
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    return load_tokenizer(extend_tokenizer(pretrained, [], 0, cache_dir or default_cache_dir()).path)


def saved_dtype(path: str | Path) -> str:
    """The dtype a model directory's ``config.json`` records (an export writes it), else ``float32``."""
    config = Path(path) / "config.json"
    if config.is_file():
        record = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):  # transformers 5 writes dtype, older versions torch_dtype
            if record.get(key) in DTYPE_NAMES:
                return record[key]
    return "float32"


def load_for_inference(
    target: str | Path,
    *,
    quant: str = "nf4",
    device: str = "auto",
    trust_remote_code: bool = False,
    dtype: str = "float32",
    own_tokenizer: bool = False,
) -> tuple[str, Any, Any]:
    """``(kind, model, tokenizer)`` in eval mode on ``device`` (``auto``: this process's GPU when there is one,
    else the CPU).

    ``kind`` is ``"final"`` for a run or adapter directory (reloaded as it was trained: ``quant`` and ``dtype``
    do not apply) and ``"base"`` for any other model (a directory or hub id), loaded with ``quant``
    (``nf4`` | ``none``) and ``dtype`` (``auto``: the one its ``config.json`` records). A base gets the base
    tokenizer its run's ``base/*`` metrics use, or with ``own_tokenizer`` the directory's own (an exported
    model's, with its chat template). A model's own Python code runs only if ``trust_remote_code`` (the
    user's flag; an adapter's record of it only ever makes loading refuse).
    """
    from bailong.model.adapter import find_adapter, load_adapter
    from bailong.model.device import run_device

    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant={quant!r}: expected one of {', '.join(QUANT_CHOICES)}")
    device = run_device(device)
    adapter = find_adapter(target)
    if adapter is not None:
        model, tokenizer = load_adapter(adapter, device=device, trust_remote_code=trust_remote_code)
        return "final", model, tokenizer
    target = str(target)
    base = ModelConfig(
        name=Path(target).name,
        pretrained=target,
        dtype=saved_dtype(target) if dtype == "auto" else dtype,
        trust_remote_code=trust_remote_code,
    )
    from bailong.model.build import load_base_model  # torch, bitsandbytes: not for --help

    model = load_base_model(base, quant=QuantConfig(name=quant), device=device)
    if own_tokenizer:
        from transformers import AutoTokenizer

        return "base", model, AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    return "base", model, base_tokenizer(target)
