"""Build the embedded mini base (models/mini-base) and its model card from the repo's data.

    python experiments/build_mini_base.py --out models/mini-base              # ship the base
    python experiments/build_mini_base.py --out models/mini-base --reference  # + English-only numbers
    python experiments/build_mini_base.py --out /tmp/mb --tiny                # seconds, for tests
    python experiments/build_mini_base.py --out models/mini-base-bbpe --tokenizer byte_level  # the Llama 3 stand-in

The data is the default data config (conf/data/pretrain_tc.yaml, its ${paths.data_dir} the data/ folder
under --data-root) prepared by the prepare stage (bailong.data.prepare.prepare_text, cached under --cache-dir,
default the project's cache: the same prepared text a default run reads): the grouped three-way split every
stage uses. Training uses each corpus's `train` split; `dev` and `test` are only evaluated, and the card
reports both. The English-only reference has the same tokenizer, architecture and steps; its weights stay in
the log directory and only its numbers go into the card. Same torch version + same --threads = bit-for-bit
the same weights.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install
from bailong.cache import default_cache_dir  # noqa: E402
from bailong.data.config import DataConfig, data_config_from_yaml  # noqa: E402
from bailong.data.prepare import SPLITS, prepare_text  # noqa: E402
from bailong.eval.bpc import bits_per_char  # noqa: E402
from bailong.model.mini_base import MiniBaseConfig, build_mini_base  # noqa: E402

DATA_CONFIG = "conf/data/pretrain_tc.yaml"  # the default data config: its corpora, split and grouping
HELD_OUT = ("dev", "test")  # evaluated, never trained on
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
TINY_MAX_DOCS = 300  # per corpus (its max_docs: the documents kept, before the split)


def data_config(data_root: Path, tiny: bool) -> DataConfig:
    """The default data config with ``${paths.data_dir}`` = ``<data_root>/data``; ``tiny``: each corpus capped at
    ``TINY_MAX_DOCS`` documents."""
    data = data_config_from_yaml(REPO / DATA_CONFIG, data_root / "data")
    if tiny:
        cap = {lang: [replace(spec, max_docs=TINY_MAX_DOCS) for spec in getattr(data, lang)] for lang in ("tc", "en")}
        data = replace(data, **cap)
    return data


def load_data(data: DataConfig, cache_dir: Path) -> tuple[dict[str, dict[str, dict[str, list[str]]]], str]:
    """``({lang: {file stem: {split: documents}}}, prepared text key)``: every corpus's train, dev and test documents
    as ``prepare_text`` splits them, EN first."""
    prepared = prepare_text(data, cache_dir)
    out: dict[str, dict] = {}
    for lang in ("en", "tc"):
        out[lang] = {}
        for i, spec in enumerate(getattr(data, lang)):
            stem = Path(spec.path).name.split(".")[0]
            out[lang][stem] = {split: list(prepared.documents_by_source(lang, split)[i]) for split in SPLITS}
    return out, prepared.root.name


def split_docs(data: dict, lang: str, split: str) -> list[str]:
    """One language's documents of ``split``, corpus after corpus."""
    return [d for parts in data[lang].values() for d in parts[split]]


def unigram_bits(counts: Counter, val: list[str]) -> float:
    """Bits of val under an add-one smoothed character unigram of the training text's character ``counts`` (one slot
    for unseen characters)."""
    total, slots = sum(counts.values()), len(counts) + 1
    return sum(-math.log2((counts[ch] + 1) / (total + slots)) for doc in val for ch in doc)


def score(model, tokenizer, docs: list[str]) -> dict:
    """Bits per character of ``docs``: the one scoring call of the card (every figure goes through here), in the
    evaluators' default windows (the model's positions: a document that fits is scored whole)."""
    return bits_per_char(model, tokenizer, docs, batch_size=8)


def evaluate(model_dir: Path, data: dict) -> dict:
    """``{split: figures}`` for dev and test: bits/char of the saved model (as shipped: loaded back) and of the
    unigram, per file and language."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # the unigram's training counts, once per language (not once per file and split)
    train_chars = {lang: Counter(ch for doc in split_docs(data, lang, "train") for ch in doc) for lang in data}
    result: dict = {}
    for split in HELD_OUT:
        figures: dict = {}
        for lang, files in data.items():
            lang_bits = lang_uni = lang_chars = 0.0
            for name, parts in files.items():
                held = parts[split]
                if not held:
                    raise SystemExit(f"{lang}/{name}: no {split} documents to evaluate (raise max_docs)")
                scored = score(model, tokenizer, held)
                uni = unigram_bits(train_chars[lang], held)
                figures[f"{lang}/{name}"] = {
                    "chars": scored["chars"],
                    "docs": len(held),
                    "bpc": round(scored["bpc"], 4),
                    "unigram_bpc": round(uni / scored["chars"], 4),
                    "tokens_per_char": round(scored["tokens_per_char"], 4),
                }
                lang_bits += scored["bits"]
                lang_uni += uni
                lang_chars += scored["chars"]
            figures[lang] = {
                "chars": int(lang_chars),
                "bpc": round(lang_bits / lang_chars, 4),
                "unigram_bpc": round(lang_uni / lang_chars, 4),
            }
        result[split] = figures
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def sentencepiece_tokenizer_lines(t: dict) -> list[str]:
    return [
        "## Tokenizer (`tokenizer.model` + transformers files)",
        f"- {t['pieces']} pieces: `<unk>` `<s>` `</s>` (ids 0-2), {t['byte_pieces']} byte pieces `<0x00>`..`<0xFF>` "
        f"(ids 3-258), English BPE pieces, then {t['han_pieces']} Han characters and {t['cjk_punct_pieces']} "
        "CJK punctuation marks (the most frequent in the TC training text)",
        "- Llama 2's settings: BPE, byte_fallback, split_digits, identity normalisation, no whitespace "
        "collapsing, dummy prefix; Chinese outside the Han pieces falls back to UTF-8 bytes",
    ]


def byte_level_tokenizer_lines(t: dict) -> list[str]:
    return [
        "## Tokenizer (`tokenizer.json`, no `tokenizer.model`)",
        f"- {t['tokens']} tokens: the {t['byte_tokens']} byte tokens (ids 0-255), {t['merges']} merges (English, "
        f"then those spelling {t['han_tokens']} Han characters and {t['cjk_punct_tokens']} CJK punctuation marks, "
        f"the most frequent in the TC training text, from their UTF-8 bytes; {t['partial_character_tokens']} tokens "
        "are partial characters), then `<|begin_of_text|>` and `<|end_of_text|>` as special tokens",
        "- Llama 3's settings: its pre-tokenizer pattern (digits in runs of 1-3), ByteLevel without its own regex, "
        "`ignore_merges`, BOS added by the post-processor; Chinese outside those characters is spelled in bytes",
    ]


def render_readme(card: dict) -> str:
    a, t, tr, ev, d = card["architecture"], card["tokenizer"], card["training"], card["eval"], card["data"]
    ref = card.get("reference")
    grouped = [f"{k} by {', '.join(v)}" for k, v in d["group_by"].items()]
    if d["dedup_group"] is not None:
        grouped.append(f"near-duplicates (estimated Jaccard >= {d['dedup_group']}) in the first copy's split")
    grouping = "grouped: " + "; ".join(grouped) if grouped else "split by each document's hash"
    byte_level = tr.get("tokenizer") == "byte_level"
    base_name = card.get("name", "mini-base")
    lines = [
        f"# {base_name}: the embedded stand-in for {'Llama 3' if byte_level else 'Llama 2'}",
        "",
        "A small English-dominant Llama (`LlamaForCausalLM`, untied embeddings) with a "
        + ("Llama-3-style byte-level" if byte_level else "Llama-2-style"),
        ("BPE tokenizer" if byte_level else "byte-fallback SentencePiece BPE tokenizer")
        + ", pre-trained from scratch on this repo's data so that",
        "bailong's tokenizer extension and embedding init can be measured without downloading weights.",
        "It knows some Traditional Chinese (a minority of its training tokens, a few hundred Han "
        + ("tokens)," if byte_level else "pieces),"),
        f"as {'Llama 3' if byte_level else 'Llama 2'} does. Rebuilt by `experiments/build_mini_base.py` (see Rebuild).",
        "",
        "## Model",
        f"- parameters: {a['parameters']:,} ({a['embedding_parameters']:,} in embed_tokens + lm_head)",
        f"- layers {a['num_hidden_layers']}, hidden {a['hidden_size']}, heads {a['num_attention_heads']}, "
        f"intermediate {a['intermediate_size']}, vocab {a['vocab_size']}, max positions {a['max_position_embeddings']}",
        f"- `model.safetensors`: {a['safetensors_bytes'] / 1e6:.1f} MB, stored in bfloat16; `config.json` says "
        "float32, so `from_pretrained` upcasts (exactly) to float32",
        "",
        *(byte_level_tokenizer_lines(t) if byte_level else sentencepiece_tokenizer_lines(t)),
        f"- held-out (dev) tokens/char: EN {card['tokens_per_char']['en']:.3f}, TC {card['tokens_per_char']['tc']:.3f}",
        "",
        "## Training",
        f"- {tr['steps']} steps x {tr['batch_size']} rows x {tr['seq_len']} tokens; tokens: EN {tr['tokens']['en']:,}, "
        f"TC {tr['tokens']['tc']:,} (TC share {tr['tc_token_share']:.0%})",
        f"- AdamW lr {tr['lr']} (warm-up {tr['warmup_steps']}, cosine to {tr['min_lr_ratio']}x), "
        f"weight decay {tr['weight_decay']}, clip {tr['grad_clip']}, bf16 autocast: {tr['bf16_autocast']}",
        f"- data: the `train` split of `{d['config']}` as the prepare stage splits it (`bailong.data.prepare`; "
        f"dev {d['val_fraction']:.0%}, test {d['test_fraction']:.0%}, split_seed {d['split_seed']}; "
        f"{grouping}), per file: "
        + ", ".join(f"`{p}`" for ps in d["files"].values() for p in ps)
        + (f"; at most {d['max_docs_per_file']} documents per file" if d["max_docs_per_file"] else ""),
        f"- wall time {tr['wall_time_s'] / 60:.1f} min on {tr['threads']} CPU threads ({card['machine']}), "
        f"seed {tr['seed']}, torch {card['versions']['torch']}, transformers {card['versions']['transformers']}",
        "",
        "## Held-out bits per character",
        "The `dev` and `test` splits of the same preparation (neither trained on; `test` is what reported figures "
        f"use); `bailong.eval.bpc.bits_per_char` in windows of {card['eval_seq_len']} positions (BOS + document, "
        "EOS not scored: each document whole where it fits, else the same character windows for every tokenizer). "
        "Unigram: add-one character unigram of the language's train split.",
        "",
        f"| text | chars dev | chars test | {base_name} dev | {base_name} test | unigram dev | unigram test |"
        + (" English-only reference dev | reference test |" if ref else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if ref else ""),
    ]
    dev, test = ev["dev"], ev["test"]
    for key in dev:
        name = f"**{key}**" if "/" not in key else key
        line = (
            f"| {name} | {dev[key]['chars']:,} | {test[key]['chars']:,} | {dev[key]['bpc']:.3f} | "
            f"{test[key]['bpc']:.3f} | {dev[key]['unigram_bpc']:.3f} | {test[key]['unigram_bpc']:.3f} |"
        )
        if ref:
            line += f" {ref['eval']['dev'][key]['bpc']:.3f} | {ref['eval']['test'][key]['bpc']:.3f} |"
        lines.append(line)
    if ref:
        lines += [
            "",
            f"The reference is the same architecture and tokenizer trained for the same {ref['steps']} "
            f"steps on English only ({ref['tokens']['en']:,} tokens, {ref['wall_time_s'] / 60:.1f} min on "
            f"{ref['threads']} CPU threads); only its numbers are kept. On test, English costs the mini base "
            f"{test['en']['bpc'] - ref['eval']['test']['en']['bpc']:+.3f} bits/char against it (the reference saw "
            f"{ref['tokens']['en'] / tr['tokens']['en']:.1f}x the English tokens); its Chinese is "
            f"{test['tc']['unigram_bpc'] - test['tc']['bpc']:.2f} bits/char below the unigram.",
        ]
    else:
        lines += ["", "English-only reference: not built yet (`--reference`)."]
    lines += [
        "",
        "## Rebuild",
        "```",
        f"python experiments/build_mini_base.py --out models/{base_name} --threads {tr['threads']}"
        + (" --tokenizer byte_level" if byte_level else ""),
        f"python experiments/build_mini_base.py --out models/{base_name} --reference --threads 1"
        + (" --tokenizer byte_level" if byte_level else "")
        + "  # as the card's reference was run",
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
    parser.add_argument(
        "--tokenizer",
        choices=("sentencepiece", "byte_level"),
        default="sentencepiece",
        help="Llama 2's layout (models/mini-base) or Llama 3's byte-level BPE (models/mini-base-bbpe)",
    )
    parser.add_argument("--steps", type=int, help="override the number of training steps")
    parser.add_argument("--threads", type=int, help="override torch threads (changes the weights' bits)")
    parser.add_argument("--log-dir", type=Path, default=Path("outputs/mini_base_build"))
    parser.add_argument("--data-root", type=Path, default=REPO, help="the folder whose data/ the corpora are in")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where the text is prepared (default: the project's cache)"
    )
    args = parser.parse_args(argv)

    cfg = replace(MiniBaseConfig(), **TINY) if args.tiny else MiniBaseConfig()
    cfg = replace(cfg, **{k: v for k, v in (("steps", args.steps), ("threads", args.threads)) if v is not None})
    cfg = replace(cfg, tokenizer=args.tokenizer)
    if args.reference:
        cfg = replace(cfg, tc_share=0.0)
    data_cfg = data_config(args.data_root, args.tiny)
    data, prepared_key = load_data(data_cfg, args.cache_dir if args.cache_dir is not None else default_cache_dir())
    train = {lang: split_docs(data, lang, "train") for lang in data}
    dev = {lang: split_docs(data, lang, "dev") for lang in data}

    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.log_dir / "reference" if args.reference else args.out
    log_path = args.log_dir / ("reference.log" if args.reference else "main.log")
    start = time.time()
    stats = build_mini_base(
        cfg, train["en"], train["tc"], model_dir, log_path, en_held_out=dev["en"], tc_held_out=dev["tc"]
    )
    ev = evaluate(model_dir, data)
    print(json.dumps(ev, indent=1))

    if args.reference:
        card_path = args.out / "card.json"
        if not card_path.is_file():
            raise SystemExit(f"{card_path} not found: build the main base first (without --reference)")
        card = json.loads(card_path.read_text())
        tokenizer_file = "tokenizer.json" if cfg.tokenizer == "byte_level" else "tokenizer.model"
        if (model_dir / tokenizer_file).read_bytes() != (args.out / tokenizer_file).read_bytes():
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
        "name": args.out.name,
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
        "tokens_per_char": {  # dev
            lang: round(
                sum(ev["dev"][f"{lang}/{n}"]["tokens_per_char"] * ev["dev"][f"{lang}/{n}"]["chars"] for n in data[lang])
                / ev["dev"][lang]["chars"],
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
        "eval_seq_len": model_cfg["max_position_embeddings"],  # the windows score() used
        "machine": cpu_name(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "config": DATA_CONFIG,
            "files": {
                lang: [Path(spec.path).relative_to(args.data_root).as_posix() for spec in getattr(data_cfg, lang)]
                for lang in data
            },
            "val_fraction": data_cfg.val_fraction,
            "test_fraction": data_cfg.test_fraction,
            "split_seed": data_cfg.split_seed,
            "group_by": {
                Path(spec.path).name.split(".")[0]: spec.group_by
                for lang in data
                for spec in getattr(data_cfg, lang)
                if spec.group_by
            },
            "dedup_group": data_cfg.dedup.group,
            "prepared_text": prepared_key,  # the cache key of the prepared text: its corpora, dedup and split
            "docs": {
                f"{lang}/{name}": {s: len(parts[s]) for s in SPLITS}
                for lang in data
                for name, parts in data[lang].items()
            },
            "max_docs_per_file": TINY_MAX_DOCS if args.tiny else None,
        },
    }
    write_card(args.out, card)


if __name__ == "__main__":
    main()
