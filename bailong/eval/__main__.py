"""Score a saved run, its adapter, or a base model on any text file, in bits per character.

    python -m bailong.eval outputs/pretrain/runs/<run> --tc held_out_zh.jsonl.gz --en held_out_en.txt
    python -m bailong.eval models/mini-base --tc data/zh_tw/modern.jsonl.gz --max-chars 20000

Prints one JSON object with the keys of metrics.json: ``final/*`` for a run or adapter, ``base/*`` for a
base model (scored with its own tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bailong.data.corpus import load_documents
from bailong.data.splits import cap_chars

DEVICE_CHOICES = ("auto", "cpu", "gpu", "cuda", "mps")  # as trainer.accelerator
DEVICE_HELP = "where the model runs (auto: this process's GPU when there is one, else the CPU)"
TRUST_REMOTE_CODE_HELP = (
    "run the Python code a base model ships with (transformers' trust_remote_code); never "
    "turned on by what a run or adapter directory says. Read that code first"
)


def load_target(target: str, quant: str, device: str = "auto", trust_remote_code: bool = False):
    """``(metrics prefix, model, tokenizer)`` for a run, an adapter or a base, loaded on ``device``
    (``auto``: this process's GPU when there is one, else the CPU); a base's own code runs only if
    ``trust_remote_code`` (the user's flag)."""
    from types import SimpleNamespace

    from bailong.model.adapter import find_adapter, load_adapter
    from bailong.model.build import load_base_model  # applies the bitsandbytes CPU repack guard
    from bailong.model.device import run_device
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    device = run_device(device)
    adapter = find_adapter(target)
    if adapter is not None:
        model, tok = load_adapter(adapter, device=device, trust_remote_code=trust_remote_code)
        return "final", model, tok
    q = SimpleNamespace(
        name=quant, quant_type="nf4", double_quant=True, compute_dtype="bfloat16", quant_storage="uint8"
    )
    model = load_base_model(target, quant=q, device=device, trust_remote_code=trust_remote_code)
    # the base tokenizer exactly as runs build it for their base/* metrics (added_vocab=0)
    cache = Path(os.environ.get("BAILONG_CACHE", Path(__file__).resolve().parents[2] / ".cache"))
    return "base", model, load_tokenizer(extend_tokenizer(target, [], 0, cache).path)


def main(argv: list[str] | None = None) -> dict:
    from bailong.eval.bpc import evaluate_texts

    ap = argparse.ArgumentParser(prog="python -m bailong.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="run directory, adapter directory, or base model (directory or hub id)")
    ap.add_argument("--tc", nargs="*", default=[], help="Traditional Chinese .txt/.jsonl(.gz) files")
    ap.add_argument("--en", nargs="*", default=[], help="English .txt/.jsonl(.gz) files")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-chars", type=int, default=None, help="cap per language (first documents)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quant", choices=["nf4", "none"], default="nf4", help="for a base model")
    ap.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    ap.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    args = ap.parse_args(argv)
    if not args.tc and not args.en:
        ap.error("give at least one file with --tc or --en")

    texts = {}
    for lang in ("tc", "en"):
        files = getattr(args, lang)
        if files:
            docs = load_documents([{"path": f, "text_field": args.text_field} for f in files])
            texts[lang] = cap_chars(docs, args.max_chars)
    prefix, model, tok = load_target(args.target, args.quant, args.device, args.trust_remote_code)
    scores = evaluate_texts(model, tok, texts, seq_len=args.seq_len, batch_size=args.batch_size)
    result = {f"{prefix}/{k}": v for k, v in scores.items()}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
