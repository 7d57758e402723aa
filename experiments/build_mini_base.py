"""Build the embedded mini base (models/mini-base) and its model card from the repo's data.

    python experiments/build_mini_base.py --out models/mini-base              # ship the base
    python experiments/build_mini_base.py --out models/mini-base --reference  # + English-only numbers
    python experiments/build_mini_base.py --out /tmp/mb --tiny                # seconds, for tests

Training uses the train side of split_documents(docs, 0.02, seed=0) of every file (the split the
rest of bailong uses); the validation side is only evaluated. The English-only reference has the
same tokenizer, architecture and steps; its weights stay in the log directory and only its
numbers go into the card. Same torch version + same --threads = bit-for-bit the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from bailong.data.config import CorpusConfig  # noqa: E402
from bailong.data.corpus import load_documents, split_documents  # noqa: E402
from bailong.eval.bpc import bits_per_char  # noqa: E402
from bailong.model.mini_base import MiniBaseConfig, build_mini_base  # noqa: E402

DATA = {
    "en": ["data/en/kjv.jsonl.gz", "data/en/fortunes.jsonl.gz"],
    "tc": ["data/zh_tw/poetry_tang.jsonl.gz", "data/zh_tw/modern.jsonl.gz", "data/zh_tw/classics.jsonl.gz"],
}
VAL_FRACTION, SPLIT_SEED = 0.02, 0
EVAL_SEQ_LEN = 256  # the scoring window of conf/data/pretrain_tc.yaml
TINY = dict(
    vocab_size=600,
    han_pieces=40,
    cjk_punct_pieces=4,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=64,
    seq_len=32,
    batch_size=4,
    steps=3,
    warmup_steps=1,
    log_every=1,
    eval_every=2,
)
TINY_MAX_DOCS = 300


def load_data(root: Path, max_docs: int | None) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """{lang: {file stem: (train, val)}}, split per file."""
    out: dict[str, dict] = {}
    for lang, paths in DATA.items():
        out[lang] = {}
        for path in paths:
            docs = load_documents([CorpusConfig(path=str(root / path), max_docs=max_docs)])
            out[lang][Path(path).name.split(".")[0]] = split_documents(docs, VAL_FRACTION, SPLIT_SEED)
    return out


def unigram_bits(train: list[str], val: list[str]) -> float:
    """Bits of val under an add-one smoothed character unigram of train (one slot for unseen characters)."""
    counts = Counter(ch for doc in train for ch in doc)
    total, slots = sum(counts.values()), len(counts) + 1
    return sum(-math.log2((counts[ch] + 1) / (total + slots)) for doc in val for ch in doc)


def evaluate(model_dir: Path, data: dict) -> dict:
    """bits/char of the saved model (as shipped: loaded back) and of the unigram, per file and language."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    result: dict = {}
    for lang, files in data.items():
        train_all = [d for tr, _ in files.values() for d in tr]
        lang_bits = lang_uni = lang_chars = 0.0
        for name, (_, val) in files.items():
            scored = bits_per_char(model, tokenizer, val, seq_len=EVAL_SEQ_LEN, batch_size=8)
            uni = unigram_bits(train_all, val)
            result[f"{lang}/{name}"] = {
                "chars": scored["chars"],
                "docs": len(val),
                "bpc": round(scored["bpc"], 4),
                "unigram_bpc": round(uni / scored["chars"], 4),
                "tokens_per_char": round(scored["tokens_per_char"], 4),
            }
            lang_bits += scored["bits"]
            lang_uni += uni
            lang_chars += scored["chars"]
        result[lang] = {
            "chars": int(lang_chars),
            "bpc": round(lang_bits / lang_chars, 4),
            "unigram_bpc": round(lang_uni / lang_chars, 4),
        }
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def render_readme(card: dict) -> str:
    a, t, tr, ev = card["architecture"], card["tokenizer"], card["training"], card["eval"]
    ref = card.get("reference")
    lines = [
        "# mini-base: the embedded stand-in for Llama 2",
        "",
        "A small English-dominant Llama (`LlamaForCausalLM`, untied embeddings) with a Llama-2-style",
        "byte-fallback SentencePiece BPE tokenizer, pre-trained from scratch on this repo's data so that",
        "bailong's tokenizer extension and embedding init can be measured without downloading weights.",
        "It knows some Traditional Chinese (a minority of its training tokens, a few hundred Han pieces),",
        "as Llama 2 does. Rebuilt by `experiments/build_mini_base.py` (see Rebuild).",
        "",
        "## Model",
        f"- parameters: {a['parameters']:,} ({a['embedding_parameters']:,} in embed_tokens + lm_head)",
        f"- layers {a['num_hidden_layers']}, hidden {a['hidden_size']}, heads {a['num_attention_heads']}, "
        f"intermediate {a['intermediate_size']}, vocab {a['vocab_size']}, max positions {a['max_position_embeddings']}",
        f"- `model.safetensors`: {a['safetensors_bytes'] / 1e6:.1f} MB, stored in bfloat16; `config.json` says "
        "float32, so `from_pretrained` upcasts (exactly) to float32",
        "",
        "## Tokenizer (`tokenizer.model` + transformers files)",
        f"- {t['pieces']} pieces: `<unk>` `<s>` `</s>` (ids 0-2), {t['byte_pieces']} byte pieces `<0x00>`..`<0xFF>` "
        f"(ids 3-258), English BPE pieces, then {t['han_pieces']} Han characters and {t['cjk_punct_pieces']} "
        "CJK punctuation marks (the most frequent in the TC training text)",
        "- Llama 2's settings: BPE, byte_fallback, split_digits, identity normalisation, no whitespace "
        "collapsing, dummy prefix; Chinese outside the Han pieces falls back to UTF-8 bytes",
        f"- held-out tokens/char: EN {card['tokens_per_char']['en']:.3f}, TC {card['tokens_per_char']['tc']:.3f}",
        "",
        "## Training",
        f"- {tr['steps']} steps x {tr['batch_size']} rows x {tr['seq_len']} tokens; tokens: EN {tr['tokens']['en']:,}, "
        f"TC {tr['tokens']['tc']:,} (TC share {tr['tc_token_share']:.0%})",
        f"- AdamW lr {tr['lr']} (warm-up {tr['warmup_steps']}, cosine to {tr['min_lr_ratio']}x), "
        f"weight decay {tr['weight_decay']}, clip {tr['grad_clip']}, bf16 autocast: {tr['bf16_autocast']}",
        f"- data: train side of `split_documents(docs, {VAL_FRACTION}, seed={SPLIT_SEED})` per file: "
        + ", ".join(f"`{p}`" for ps in DATA.values() for p in ps),
        f"- wall time {tr['wall_time_s'] / 60:.1f} min on {tr['threads']} CPU threads ({card['machine']}), "
        f"seed {tr['seed']}, torch {card['versions']['torch']}, transformers {card['versions']['transformers']}",
        "",
        "## Held-out bits per character",
        f"Validation side of the same split; `bailong.eval.bpc.bits_per_char`, seq_len {card['eval_seq_len']} "
        "(BOS + document, EOS not scored). Unigram: add-one character unigram of the language's train split.",
        "",
        "| text | chars | mini-base | unigram |" + (" English-only reference |" if ref else ""),
        "|---|---:|---:|---:|" + ("---:|" if ref else ""),
    ]
    for key, row in ev.items():
        name = f"**{key}**" if "/" not in key else key
        line = f"| {name} | {row['chars']:,} | {row['bpc']:.3f} | {row['unigram_bpc']:.3f} |"
        lines.append(line + (f" {ref['eval'][key]['bpc']:.3f} |" if ref else ""))
    if ref:
        lines += [
            "",
            f"The reference is the same architecture and tokenizer trained for the same {ref['steps']} "
            f"steps on English only ({ref['tokens']['en']:,} tokens, {ref['wall_time_s'] / 60:.1f} min on "
            f"{ref['threads']} CPU threads); only its numbers are kept. English costs the mini base "
            f"{ev['en']['bpc'] - ref['eval']['en']['bpc']:+.3f} bits/char against it (the reference saw "
            f"{ref['tokens']['en'] / tr['tokens']['en']:.1f}x the English tokens); its Chinese is "
            f"{ev['tc']['unigram_bpc'] - ev['tc']['bpc']:.2f} bits/char below the unigram.",
        ]
    else:
        lines += ["", "English-only reference: not built yet (`--reference`)."]
    lines += [
        "",
        "## Rebuild",
        "```",
        "python experiments/build_mini_base.py --out models/mini-base",
        "python experiments/build_mini_base.py --out models/mini-base --reference --threads 1"
        "  # as the card's reference was run",
        "```",
        f"Same torch version and thread count ({tr['threads']}) give bit-for-bit the same `model.safetensors` "
        "(seeded init, seeded data order, single process); another thread count or torch build changes the "
        "floating-point summation order and so the weights.",
        "",
    ]
    return "\n".join(lines)


def write_card(out: Path, card: dict) -> None:
    (out / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(render_readme(card))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/mini-base"))
    parser.add_argument(
        "--reference",
        action="store_true",
        help="train the English-only reference and add its numbers to <out>/card.json",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, a few steps, few documents (tests)")
    parser.add_argument("--steps", type=int, help="override the number of training steps")
    parser.add_argument("--threads", type=int, help="override torch threads (changes the weights' bits)")
    parser.add_argument("--log-dir", type=Path, default=Path("outputs/mini_base_build"))
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)

    cfg = replace(MiniBaseConfig(), **TINY) if args.tiny else MiniBaseConfig()
    cfg = replace(cfg, **{k: v for k, v in (("steps", args.steps), ("threads", args.threads)) if v is not None})
    if args.reference:
        cfg = replace(cfg, tc_share=0.0)
    data = load_data(args.data_root, TINY_MAX_DOCS if args.tiny else None)
    train = {lang: [d for tr, _ in files.values() for d in tr] for lang, files in data.items()}
    val = {lang: [d for _, v in files.values() for d in v] for lang, files in data.items()}

    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.log_dir / "reference" if args.reference else args.out
    log_path = args.log_dir / ("reference.log" if args.reference else "main.log")
    start = time.time()
    stats = build_mini_base(
        cfg, train["en"], train["tc"], model_dir, log_path, en_held_out=val["en"], tc_held_out=val["tc"]
    )
    ev = evaluate(model_dir, data)
    print(json.dumps(ev, indent=1))

    if args.reference:
        card_path = args.out / "card.json"
        if not card_path.is_file():
            raise SystemExit(f"{card_path} not found: build the main base first (without --reference)")
        card = json.loads(card_path.read_text())
        if (model_dir / "tokenizer.model").read_bytes() != (args.out / "tokenizer.model").read_bytes():
            raise SystemExit("the reference's tokenizer differs from the shipped one: settings differ")
        card["reference"] = {
            "steps": stats["steps"],
            "tokens": stats["tokens"],
            "wall_time_s": stats["wall_time_s"],
            "threads": cfg.threads,
            "seed": cfg.seed,
            "eval": ev,
        }
        write_card(args.out, card)
        return

    model_cfg = json.loads((model_dir / "config.json").read_text())
    tokens = stats["tokens"]
    card = {
        "architecture": {
            "class": "LlamaForCausalLM",
            "parameters": stats["parameters"],
            "embedding_parameters": 2 * cfg.vocab_size * cfg.hidden_size,
            "safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
            **{
                k: model_cfg[k]
                for k in (
                    "num_hidden_layers",
                    "hidden_size",
                    "num_attention_heads",
                    "intermediate_size",
                    "vocab_size",
                    "max_position_embeddings",
                    "tie_word_embeddings",
                )
            },
        },
        "tokenizer": stats["tokenizer"],
        "tokens_per_char": {
            lang: round(
                sum(ev[f"{lang}/{n}"]["tokens_per_char"] * ev[f"{lang}/{n}"]["chars"] for n in data[lang])
                / ev[lang]["chars"],
                4,
            )
            for lang in data
        },
        "training": {
            **stats["config"],
            "steps": stats["steps"],
            "tokens": tokens,
            "tc_token_share": round(tokens["tc"] / (tokens["en"] + tokens["tc"]), 4),
            "epochs_started": stats["epochs"],
            "wall_time_s": stats["wall_time_s"],
            "build_time_s": round(time.time() - start, 1),
        },
        "eval": ev,
        "eval_seq_len": EVAL_SEQ_LEN,
        "machine": cpu_name(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "files": DATA,
            "val_fraction": VAL_FRACTION,
            "split_seed": SPLIT_SEED,
            "max_docs_per_file": TINY_MAX_DOCS if args.tiny else None,
        },
    }
    write_card(args.out, card)


if __name__ == "__main__":
    main()
