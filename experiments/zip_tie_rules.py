"""Step-0 bits/char of every init strategy and every zip_tie input x output rule on the mini base.

    .venv/bin/python experiments/zip_tie_rules.py                  # everything (~35 min on 2 shared CPUs)
    .venv/bin/python experiments/zip_tie_rules.py --only 'zip_tie:last/*,mean' --decompose

Extends the base tokenizer with the TC training split (the pipeline's: the default data config,
conf/data/pretrain_tc.yaml, prepared by the prepare stage), initialises the new rows of a fresh copy of the base
for each configuration, and measures bits/char on capped `dev` text (choices are made on dev; `test` is never
read here), before any training: TC (the three TC corpora, equal shares) and EN (the two EN corpora). The base
itself is measured with the same tokenizer construction and no added pieces. Prints a markdown table, writes JSON
(see --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402

from bailong.data.config import data_config_from_yaml  # noqa: E402
from bailong.data.prepare import prepare_text  # noqa: E402
from bailong.embedding import find_new_tokens, init_options, resize_and_initialize  # noqa: E402
from bailong.embedding.distill import spell_out  # noqa: E402
from bailong.embedding.pieces import PIECE_RULES  # noqa: E402
from bailong.eval.bpc import bits_per_char  # noqa: E402
from bailong.tokenization.extend import extend_tokenizer, load_tokenizer  # noqa: E402

DATA_CONFIG = ROOT / "conf" / "data" / "pretrain_tc.yaml"  # the default run's corpora, split and grouping


def shown_path(path: str) -> str:
    """A path inside the repository as written from its root (the JSON is committed: no machine's directories)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def capped(docs: list[str], max_chars: int) -> list[str]:
    """Whole validation documents until ``max_chars``, the last one cut: seconds per measurement."""
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc[: max_chars - total])
        total += len(out[-1])
    return out


def configurations(shift_tokens: int) -> list[tuple[str, dict]]:
    shift = {"shift_max_tokens": shift_tokens}
    runs = [
        ("random", {"name": "random"}),
        ("mean", {"name": "mean"}),
        ("multivariate", {"name": "multivariate"}),
        ("multivariate:1e-9", {"name": "multivariate", "covariance_scale": 1e-9}),
        ("subword_mean", {"name": "subword_mean"}),
    ]
    for output_rule in PIECE_RULES + ("first_shift",):
        for input_rule in PIECE_RULES:
            runs.append(
                (
                    f"zip_tie:{input_rule}/{output_rule}",
                    {"name": "zip_tie", "input_rule": input_rule, "output_rule": output_rule, **shift},
                )
            )
    for extra in (
        {"absorbed_mass_bias": False},
        {"shift_estimate": "occurrence"},
        {"shift_bias": 0.0},
        {"shift_bias": 1.0},
        {"shift_ridge": 1e-1},
        {"shift_max_tokens": shift_tokens // 4},
        {"shift_max_tokens": shift_tokens * 2},
    ):
        tag = ",".join(f"{k}={v}" for k, v in extra.items())
        runs.append(
            (
                f"zip_tie:last/first_shift,{tag}",
                {"name": "zip_tie", "input_rule": "last", "output_rule": "first_shift", **shift, **extra},
            )
        )
    for extra in ({}, {"steps": 50}, {"lr": 0.01}, {"output_loss": "match"}, {"start_from": "subword_mean"}):
        tag = ",".join(f"{k}={v}" for k, v in extra.items()) or "default"
        runs.append((f"distill:{tag}", {"name": "distill", **shift, **extra}))
    return runs


def initialise(base, base_tok, tok, cfg: dict, texts: list[str], head_cache: dict) -> tuple:
    """A fresh copy of the base with new rows by ``cfg``. zip_tie's output rows do not depend on its
    input rule, so a first_shift head (a corpus pass) is computed once per set of shift options."""
    model = copy.deepcopy(base)
    key = json.dumps({k: v for k, v in cfg.items() if k != "input_rule"}, sort_keys=True)
    if cfg["name"] != "zip_tie" or cfg.get("output_rule") != "first_shift" or key not in head_cache:
        report = resize_and_initialize(model, base_tok, tok, init_options(**cfg), texts=texts, seed=0)
        if cfg["name"] == "zip_tie" and cfg.get("output_rule") == "first_shift":
            head_cache[key] = (model.get_output_embeddings().weight[len(base_tok) :].detach().clone(), report)
        return model, report
    head, shift_report = head_cache[key]
    report = resize_and_initialize(
        model, base_tok, tok, init_options(**{**cfg, "output_rule": "first"}), texts=texts, seed=0
    )
    with torch.no_grad():
        model.get_output_embeddings().weight[len(base_tok) :] = head
    info = {**shift_report["info"], "input_rule": cfg["input_rule"]}
    return model, {**report, "info": info, "seconds": shift_report["seconds"]}


@torch.no_grad()
def decompose(model, tok, new, texts: list[str], seq_len: int) -> dict:
    """Where the step-0 TC loss comes from, on the first ``seq_len`` extended tokens of each text.

    teacher: the base reading the new tokens spelled out in base pieces (chained piece log-probs);
    output_only: the extended head on the teacher's hidden states (only the new output rows differ);
    student: the extended model itself. output_only - teacher is what the output rule loses,
    student - output_only what the input rule loses."""
    head, nb = model.get_output_embeddings().weight, new.num_base
    bits = {"teacher": 0.0, "output_only": 0.0, "student": 0.0}
    chars = 0
    for text in texts:
        ids = tok(text)["input_ids"][:seq_len]
        spelled, ends = spell_out(ids, nb, new.base_pieces)
        h_teacher = model.get_decoder()(input_ids=torch.tensor([spelled])).last_hidden_state[0]
        h_student = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
        piece_lp = torch.log_softmax(h_teacher @ head[:nb].T, -1)[:-1].gather(1, torch.tensor(spelled[1:])[:, None])
        cum = torch.cat([torch.zeros(1), piece_lp.squeeze(1).cumsum(0)])
        at, nxt = torch.tensor(ends[:-1]), torch.tensor(ids[1:])
        bits["teacher"] -= (cum[torch.tensor(ends[1:])] - cum[at]).sum().item()
        bits["output_only"] -= torch.log_softmax(h_teacher[at] @ head.T, -1).gather(1, nxt[:, None]).sum().item()
        bits["student"] -= torch.log_softmax(h_student[:-1] @ head.T, -1).gather(1, nxt[:, None]).sum().item()
        chars += len(tok.decode(ids[1:]))
    return {k: v / math.log(2) / chars for k, v in bits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/mini-base"))
    parser.add_argument("--added-vocab", type=int, default=8000, help="default: tokenizer.added_vocab's")
    parser.add_argument("--max-chars", type=int, default=12000, help="validation characters per language")
    parser.add_argument("--seq-len", type=int, default=None, help="scoring window (default: the model's positions)")
    parser.add_argument("--shift-tokens", type=int, default=400_000, help="zip_tie shift_max_tokens")
    parser.add_argument(
        "--only", default="", help="comma-separated names, 'prefix*' for all that start so; 'base' is always run"
    )
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--out", default=str(ROOT / "experiments/results/zip_tie_rules.json"))
    parser.add_argument("--decompose", action="store_true", help="also split the TC loss into output and input rule")
    args = parser.parse_args()
    torch.manual_seed(0)

    data = data_config_from_yaml(DATA_CONFIG, ROOT / "data")
    prepared = prepare_text(data, args.cache_dir)
    tc_train = list(prepared.documents("tc", "train"))

    def dev(lang: str) -> list[str]:
        sources = prepared.documents_by_source(lang, "dev")
        return [d for docs in sources for d in capped(list(docs), args.max_chars // len(sources))]

    tc_val, en_val = dev("tc"), dev("en")

    start = time.perf_counter()
    base_tok = load_tokenizer(extend_tokenizer(args.model, tc_train, 0, args.cache_dir).path)
    extended = extend_tokenizer(args.model, tc_train, args.added_vocab, args.cache_dir)
    tok = load_tokenizer(extended.path)
    new = find_new_tokens(base_tok, tok)
    print(f"tokenizers: base {len(base_tok)}, extended {len(tok)} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    def measure(model, tokenizer) -> dict:
        tc_m = bits_per_char(model, tokenizer, tc_val, seq_len=args.seq_len, batch_size=8)
        en_m = bits_per_char(model, tokenizer, en_val, seq_len=args.seq_len, batch_size=8)
        return {"tc_bpc": tc_m["bpc"], "en_bpc": en_m["bpc"], "tc_tokens_per_char": tc_m["tokens_per_char"]}

    results = [{"name": "base", **measure(base, base_tok), "init_seconds": 0.0}]
    print(f"| {'init':44} | TC bits/char | EN bits/char | init s |", flush=True)
    print(f"| base{'':40} | {results[0]['tc_bpc']:12.4f} | {results[0]['en_bpc']:12.4f} | {0:6.1f} |", flush=True)
    wanted = [w for w in args.only.split(",") if w]
    head_cache: dict = {}
    for name, cfg in configurations(args.shift_tokens):
        if wanted and not any(name.startswith(w[:-1]) if w.endswith("*") else name == w for w in wanted):
            continue
        model, report = initialise(base, base_tok, tok, cfg, tc_train, head_cache)
        row = {
            "name": name,
            **measure(model, tok),
            "init_seconds": report["seconds"],
            "config": cfg,
            "info": report["info"],
        }
        results.append(row)
        print(f"| {name:44} | {row['tc_bpc']:12.4f} | {row['en_bpc']:12.4f} | {row['init_seconds']:6.1f} |", flush=True)
        if args.decompose:
            row["tc_decomposition"] = decompose(model, tok, new, tc_val, args.seq_len or 256)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in row["tc_decomposition"].items())
            print("    TC bits/char " + parts, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": shown_path(args.model),
                "added_vocab": args.added_vocab,
                "num_added": extended.num_added,
                "tc_val_chars": sum(map(len, tc_val)),
                "en_val_chars": sum(map(len, en_val)),
                "seq_len": args.seq_len,  # null: the model's positions
                "split": "dev",
                "prepared_text": prepared.root.name,
                "results": results,
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
