"""Merge a run's adapter (LoRA and new embedding rows) into a standalone Hugging Face model directory.

    python -m bailong.export outputs/sft/runs/<run> exports/bailong-mini-instruct [--dtype bfloat16]
    python -m bailong.export outputs/sft/runs/<run> exports/bailong-mini-instruct --gguf [--gguf-type q8_0]

The result loads with plain ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
(no peft, no bitsandbytes) and carries what other tools read: the merged SentencePiece ``tokenizer.model``
beside ``tokenizer.json`` (llama.cpp's converter and SentencePiece-based loaders read it), the chat template
with HF's training-only ``{% generation %}`` markers taken out (they render nothing, and template engines
other than transformers' reject the tag) and a generation config with the paper's sampling settings.
``--gguf`` then converts the directory with llama.cpp's own converter (``bailong/gguf.py``).

The model is dequantised: a 4-bit run trained its LoRA against the NF4 weights, not the original ones, so
the merge starts from the NF4 weights dequantised to full precision (``bitsandbytes.functional.dequantize_4bit``),
loads the adapter onto that full-precision copy and lets peft merge it (``merge_and_unload``: W + B·A·alpha/r,
trainable-token rows written into the matrices).
Merging on the 4-bit model instead would quantise the merged weights again and lose the update.
A full fine-tuning run (``finetune=full``) has nothing to merge: its export is a copy in ``--dtype``.

What remains different from the adapter run is arithmetic, not weights: the 4-bit layers compute in
``quant.compute_dtype`` (bfloat16 by default), the merged model in ``--dtype``. ``tests/test_export.py``
checks the logits against the adapter run with its compute dtype set to float32 (same numbers up to
float32 summation order) and as trained (bfloat16 rounding of the activations).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import peft
import torch
from transformers import GenerationConfig

from bailong.eval.config import PAPER_SAMPLING
from bailong.eval.generate import PLAIN_CHAT_TEMPLATE
from bailong.gguf import GGUF_TYPES, GGUFError, convert_to_gguf, needs_sentencepiece_model
from bailong.model.adapter import META_FILE, built_base, built_quant, find_adapter, load_adapter, read_meta
from bailong.model.build import DTYPES, is_quantised, load_base_model
from bailong.model.config import QuantConfig
from bailong.model.device import run_device
from bailong.model.loading import DEVICE_CHOICES, DEVICE_HELP, TRUST_REMOTE_CODE_HELP
from bailong.tokenization import SP_MODEL_FILE, sentencepiece_matches

log = logging.getLogger(__name__)

# transformers' markers of the assistant's tokens for training masks; rendering ignores them
GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def inference_chat_template(template: str | None) -> str:
    """The chat template for tools that only render it: no ``{% generation %}`` markers (llama.cpp's and
    other Jinja engines reject the tag); a tokenizer without a template gets the plain layout bailong's own
    evaluation uses for it (``bailong.eval.generate``)."""
    return GENERATION_TAGS.sub("", template or PLAIN_CHAT_TEMPLATE)


def dequantised_weights(
    build: dict, device: torch.device | None = None, trust_remote_code: bool = False
) -> dict[str, torch.Tensor]:
    """The base's 4-bit projection weights as the adapter run saw them, dequantised: ``{module name: weight}``
    (``trust_remote_code``: the user's consent, checked by ``load_adapter`` before this runs)."""
    quantised = load_base_model(
        built_base(build, trust_remote_code=bool(build.get("trust_remote_code")) and trust_remote_code),
        quant=built_quant(build),
        device=device,
    )
    weights = {}
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[name] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return weights


def merged_model(
    adapter_dir: str | Path, device: torch.device | None = None, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any, dict]:
    """(plain transformers model, tokenizer, build settings) with the adapter merged into dequantised weights."""
    path, adapter_dir = adapter_dir, find_adapter(adapter_dir)
    if adapter_dir is None:
        raise FileNotFoundError(f"{path}: no {META_FILE} here or in adapter/: not a bailong run or adapter directory")
    build = read_meta(adapter_dir)["build"]
    model, tokenizer = load_adapter(
        adapter_dir,
        quant=QuantConfig(name="none"),
        device=device,  # full-precision base + adapter
        trust_remote_code=trust_remote_code,
    )
    if is_quantised(built_quant(build)):
        base = model.get_base_model()
        for name, weight in dequantised_weights(build, device, trust_remote_code).items():
            layer = base.get_submodule(name)
            if isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer):
                layer = layer.get_base_layer()
            if tuple(layer.weight.shape) != tuple(weight.shape):
                raise RuntimeError(f"{name}: dequantised weight {tuple(weight.shape)} != {tuple(layer.weight.shape)}")
            with torch.no_grad():
                layer.weight.copy_(weight.to(layer.weight.dtype))
    merged = model.merge_and_unload() if isinstance(model, peft.PeftModel) else model  # full fine-tuning: a copy
    merged.eval()
    if merged.get_input_embeddings().weight.shape[0] > build["vocab_size"]:
        # padding rows exist for tensor-core shapes in training; a tool that loads the export expects one row
        # per token (llama.cpp, vLLM and others check the vocabulary against the matrices)
        merged.resize_token_embeddings(build["vocab_size"], mean_resizing=False)
    return merged, tokenizer, build


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    gguf_type: str | None = None,
    llama_cpp_dir: str | Path | None = None,
    gguf_pre: str | None = None,
) -> Path:
    """Write the merged model, its tokenizer (with chat template and ``tokenizer.model``) and a generation config
    to ``out_dir`` and, with ``gguf_type``, ``<out_dir>/<name>-<gguf_type>.gguf`` (``trust_remote_code``: the user's
    consent to run the base's own code, if the adapter's base has any)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new directory")
    adapter = find_adapter(run_dir)
    sp_model = (adapter or Path(run_dir)) / SP_MODEL_FILE
    missing = adapter is not None and needs_sentencepiece_model(adapter) and not sp_model.is_file()
    if gguf_type is not None and missing:  # fail before the merge
        raise GGUFError(
            f"{adapter}: no {SP_MODEL_FILE}, which llama.cpp needs for a Llama vocabulary (runs save it beside the "
            "adapter since bailong carries it; an older run has none). Copy the run's extended tokenizer's "
            f"{SP_MODEL_FILE} (<cache_dir>/tokenizers/<key>/, whose extension.json names the base and size) into "
            f"{adapter}/ and export again"
        )
    model, tokenizer, build = merged_model(run_dir, run_device(device), trust_remote_code)
    model = model.to(DTYPES[dtype])
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        do_sample=True,
        **asdict(PAPER_SAMPLING),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = inference_chat_template(tokenizer.chat_template)
    tokenizer.save_pretrained(out)
    if sentencepiece_matches(tokenizer, sp_model):
        shutil.copyfile(sp_model, out / SP_MODEL_FILE)
    elif sp_model.is_file():
        log.warning("%s does not match the run's tokenizer: not copied to the export", sp_model)
    (out / "bailong_export.json").write_text(
        json.dumps(
            {
                "source": str(find_adapter(run_dir)),
                "dtype": dtype,
                "dequantised_from": build["quant"],
                "base": build["pretrained"],
                "vocab_size": build["vocab_size"],
                "num_base": build["num_base"],
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    if gguf_type is not None:
        convert_to_gguf(
            out, out / f"{out.name}-{gguf_type}.gguf", gguf_type, llama_cpp_dir=llama_cpp_dir, pre_tokenizer=gguf_pre
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bailong.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or adapter directory")
    parser.add_argument("out", help="new directory for the merged model")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument("--gguf", action="store_true", help="also write <out>/<name>-<type>.gguf for llama.cpp")
    parser.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES, help="GGUF tensor type (default: f16)")
    parser.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="llama.cpp checkout whose convert_hf_to_gguf.py to use (default: "
        "$LLAMA_CPP_DIR, else the installed llama-cpp-python's own, fetched once)",
    )
    parser.add_argument(
        "--gguf-pre",
        metavar="NAME",
        help="a byte-level base's BPE pre-tokenizer name where llama.cpp does not know the base (llama-bpe: Llama 3's "
        "pattern, the byte-level mini base's too)",
    )
    args = parser.parse_args(argv)
    out = export(
        args.run,
        args.out,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        gguf_type=args.gguf_type if args.gguf else None,
        llama_cpp_dir=args.llama_cpp,
        gguf_pre=args.gguf_pre,
    )
    print("\n".join([str(out), *map(str, sorted(out.glob("*.gguf")))]))


if __name__ == "__main__":
    main()
