"""Time of every init strategy writing 27,241 new rows into a 32,000 x 4,096 embedding and head.

    python benchmarks/init_speed.py                      # every strategy (~4 min at 1 thread)
    python benchmarks/init_speed.py --strategies mean zip_tie

What is measured, and why it is fair:
- Llama-2 shapes where the strategies' cost lives: a 32,000-piece base vocabulary, hidden size 4,096,
  untied embedding and head (random weights), 27,241 appended pieces (Bailong's count);
- the pieces are real: the mini base's tokenizer extended by 27,241 TC pieces learnt from the TC
  corpus (``extend_tokenizer``, cached), with 27,000 inert ASCII filler pieces between the mini base's
  5,000 and the new ones so the base vocabulary has Llama 2's 32,000 rows;
- ``zip_tie`` and ``distill`` also run the *base model* over the corpus. That cost is a forward pass of
  whatever base is used (7B on a GPU in the real recipe), not of the init rule, so the body here is one
  random Llama layer at hidden 4,096 (the head is the full 32,000 x 4,096), and the corpus pass is
  reported separately per 1,000 corpus tokens (``--shift-tokens`` of them) next to the rows' own time;
- ``distill`` learns: it reports seconds per step and per 1,000 student tokens (``--distill-steps`` steps).
Each strategy starts from the same model: rows past 32,000 are dropped between strategies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config, machine, peak_rss_mib  # noqa: E402

NUM_BASE, NUM_NEW, HIDDEN = 32_000, 27_241, 4_096
NON_LEARNED = ("random", "mean", "multivariate", "subword_mean", "zip_tie")


def tokenizers(cfg):
    """(base, extended) tokenizers: 32,000 base pieces, then 27,241 appended TC pieces."""
    from omegaconf import OmegaConf

    from bailong.data.splits import load_splits
    from bailong.tokenization import extend_tokenizer
    from bailong.tokenization.extend import hf_tokenizer_from_proto, read_base_model
    from bailong.tokenization.merge import append_pieces
    from bailong.tokenization.train import load_model_proto

    splits = load_splits(OmegaConf.to_object(cfg.data))
    ext = extend_tokenizer(cfg.model.pretrained, splits.tc_train, NUM_NEW, Path(cfg.paths.cache_dir))
    mini = load_model_proto(*read_base_model(cfg.model.pretrained))
    extended = load_model_proto(*read_base_model(ext.path))
    new = [p.piece for p in extended.pieces[len(mini.pieces) :]]
    fillers = [f"zzfill{i}" for i in range(NUM_BASE - len(mini.pieces))]  # unreachable ASCII: never produced
    base = append_pieces(mini, fillers)
    return hf_tokenizer_from_proto(base), hf_tokenizer_from_proto(append_pieces(base, new)), splits.tc_train


def random_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=NUM_BASE,
        hidden_size=HIDDEN,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    from bailong.embedding import available_strategies, init_options, resize_and_initialize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=available_strategies())
    parser.add_argument("--shift-tokens", type=int, default=4_000, help="corpus tokens of zip_tie's base pass")
    parser.add_argument("--distill-steps", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([], str(Path(tmp) / "run"))
    started = time.perf_counter()
    base_tok, tok, texts = tokenizers(cfg)
    setup_seconds = time.perf_counter() - started
    model = random_llama()
    results = {}
    for name in args.strategies:
        options = {"name": name}
        if name in ("zip_tie", "distill"):
            options.update(shift_max_tokens=args.shift_tokens)
        if name == "distill":
            options.update(steps=args.distill_steps)
        model.resize_token_embeddings(NUM_BASE, mean_resizing=False)  # back to the base: old rows never change
        t0 = time.perf_counter()
        report = resize_and_initialize(model, base_tok, tok, init_options(**options), texts=texts, seed=0)
        seconds = time.perf_counter() - t0
        info = report["info"]
        entry = {"seconds": round(seconds, 2), "num_new": report["num_new"]}
        corpus_pass = info.get("corpus_pass_seconds")
        if corpus_pass is not None:
            tokens = info.get("shift_tokens") or info.get("corpus_tokens") or args.shift_tokens
            entry.update(
                corpus_pass_seconds=corpus_pass,
                corpus_pass_tokens=tokens,
                corpus_pass_seconds_per_1k_tokens=round(1000 * corpus_pass / max(1, tokens), 3),
                rows_seconds=round(seconds - corpus_pass, 2),
            )
        if name == "distill":
            train = info.get("train_seconds", seconds)
            steps = info.get("steps", args.distill_steps)
            student = steps * options.get("batch_size", 16) * options.get("context_len", 32)
            entry.update(
                train_seconds=train,
                steps=steps,
                seconds_per_step=round(train / max(1, steps), 2),
                seconds_per_1k_student_tokens=round(1000 * train / max(1, student), 3),
            )
        if name in NON_LEARNED:
            entry["under_10s"] = (entry.get("rows_seconds", seconds)) < 10
        results[name] = entry
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "benchmark": "init_speed",
                "machine": machine(),
                "shapes": {
                    "base_vocab": NUM_BASE,
                    "new_rows": len(tok) - len(base_tok),
                    "hidden": HIDDEN,
                    "tied": False,
                },
                "tokenizer_setup_seconds": round(setup_seconds, 1),
                "peak_rss_mib": round(peak_rss_mib(), 1),
                "strategies": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
