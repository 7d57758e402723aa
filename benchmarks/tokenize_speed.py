"""Tokenizer and data-pipeline speed: is the data ever the training bottleneck?

    python benchmarks/tokenize_speed.py                          # ~2 min at 1 thread
    python benchmarks/tokenize_speed.py --train-tokens-per-sec 900   # compare with a measured training rate

Measures, on the run's TC and EN training text (conf/data/pretrain_tc):
- characters/s of the extended tokenizer (mini base + 8,000 TC pieces) and of the base tokenizer, batch-
  encoding documents as the data module does (``tokenize_documents``), in ``--repeats`` paired rounds: the
  speed ratio is the median of the rounds' ratios, the rates those of the median round;
- the packing pipeline as the run builds it: ``PretrainDataModule.setup`` (tokenise both languages, plan the
  TC/EN mix, pack) once, then the training DataLoader's tokens/s;
- headroom: the loader's tokens/s over the training step's tokens/s (``--train-tokens-per-sec``, default:
  the bailong mini figure from ``benchmarks/train_throughput.py``), and setup time as steps of training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config, extended_tokenizer, machine  # noqa: E402


def chars_per_sec(tokenizer, docs: list[str]) -> dict:
    from bailong.data.packing import tokenize_documents

    tokenize_documents(tokenizer, docs[:64])  # warm-up
    t0 = time.perf_counter()
    ids = tokenize_documents(tokenizer, docs)
    seconds = time.perf_counter() - t0
    chars = sum(len(d) for d in docs)
    tokens = sum(len(x) for x in ids)
    return {
        "chars": chars,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "chars_per_sec": round(chars / seconds),
        "tokens_per_sec": round(tokens / seconds),
        "tokens_per_char": round(tokens / chars, 4),
    }


def main() -> None:
    from omegaconf import OmegaConf

    from bailong.data.pretrain import PretrainDataModule
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--train-tokens-per-sec",
        type=float,
        default=None,
        help="training step tokens/s to compare with (default: measured mini bailong figure)",
    )
    parser.add_argument("--loader-batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds (extended, then base) per language")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([], str(Path(tmp) / "run"))
        splits, tok, _ = extended_tokenizer(cfg)
        base_tok = load_tokenizer(extend_tokenizer(cfg.model.pretrained, [], 0, Path(cfg.paths.cache_dir)).path)
        result = {"benchmark": "tokenize_speed", "machine": machine(), "tokenizers": {}}
        train = {lang: list(splits.train_documents(lang)) for lang in ("tc", "en")}
        for lang, docs in train.items():
            rounds = [(chars_per_sec(tok, docs), chars_per_sec(base_tok, docs)) for _ in range(args.repeats)]
            ratios = [e["chars_per_sec"] / b["chars_per_sec"] for e, b in rounds]  # paired: one round each
            middle = rounds[ratios.index(statistics.median_low(ratios))]
            result["tokenizers"][lang] = {
                "extended": middle[0],
                "base": middle[1],
                "extended_over_base_chars_per_sec": round(statistics.median(ratios), 2),
                "extended_over_base_each_round": [round(r, 3) for r in ratios],
            }

        data = PretrainDataModule.from_config(
            tok, OmegaConf.to_object(cfg.data), seed=cfg.seed, splits=splits, cache_dir=Path(tmp) / "cache"
        )
        t0 = time.perf_counter()
        data._build_train()  # what setup("fit") does for training: tokenise and pack into shards (a fresh cache)
        setup_seconds = time.perf_counter() - t0
        chars = sum(len(d) for docs in train.values() for d in docs)
        loader = data.train_dataloader()
        t0, tokens, batches = time.perf_counter(), 0, 0
        while batches < args.loader_batches:
            for batch in loader:
                tokens += batch["input_ids"].numel()
                batches += 1
                if batches >= args.loader_batches:
                    break
        loader_seconds = time.perf_counter() - t0
    loader_tps = tokens / loader_seconds
    train_tps = args.train_tokens_per_sec
    result["packing"] = {
        "setup_seconds": round(setup_seconds, 2),
        "corpus_chars": chars,
        "setup_chars_per_sec": round(chars / setup_seconds),
        "packed_sequences": int(data.train_sequences.shape[0]),
        "seq_len": cfg.data.seq_len,
        "loader_batches": batches,
        "loader_tokens_per_sec": round(loader_tps),
    }
    if train_tps:
        step_tokens = cfg.data.batch_size * cfg.data.seq_len
        result["headroom"] = {
            "train_tokens_per_sec": train_tps,
            "loader_over_training": round(loader_tps / train_tps, 1),
            "loader_share_of_a_step": round(train_tps / loader_tps, 5),
            "setup_in_training_steps": round(setup_seconds / (step_tokens / train_tps), 2),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
