"""Evaluate a saved run, its adapter, or a base model: one command, one subcommand per evaluation.

    python -m bailong.eval bpc outputs/pretrain/runs/<run> --tc held_out_zh.jsonl.gz --en held_out_en.txt
    python -m bailong.eval bpc models/mini-base --tc data/zh_tw/modern.jsonl.gz --max-chars 20000
    python -m bailong.eval mc outputs/pretrain/runs/<run> "mc.files=[my_mc.jsonl]"  # -> <run>/instruct_eval/mc/
    python -m bailong.eval bench outputs/sft/runs/<run> --judge-url http://127.0.0.1:8000/v1 --judge-model m
    python -m bailong.eval bench --model-url http://127.0.0.1:8000/v1 --model-name m --out /tmp/served  # served
    python -m bailong.eval instruct models/mini-base --out /tmp/base_eval          # mc + bench
    python -m bailong.eval parallel outputs/sft/runs/<run>     # information parity, translation chrF
    python -m bailong.eval harness outputs/sft/runs/<run>      # lm-evaluation-harness on the same MC items

``bpc``: bits per character of any text files, keys as in metrics.json: ``final/*`` for a run or adapter,
``base/*`` for a base model (scored with its own base tokenizer). ``mc``, ``bench``, ``instruct`` (both),
``parallel`` and ``harness`` take config overrides (``mc.items_per_lang=500``, ``judge.timeout_s=120``) and
write their files under ``--out`` (default: ``<run>/instruct_eval``; ``bench``: the run directory itself, whose
metrics.json then gets the ``bench/*`` keys). ``bench --model-url URL`` (or ``bench.server.base_url=URL``) answers
through a model served behind an OpenAI-compatible endpoint instead: no model is loaded, no target is given, and
``--out`` is required. Each prints one JSON object of metrics. Every subcommand runs the
registered evaluators of ``bailong.eval.evaluators``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from bailong.errors import ConfigError
from bailong.eval.evaluators import EvalContext, run_evaluators
from bailong.model.loading import (
    DEVICE_CHOICES,
    DEVICE_HELP,
    QUANT_CHOICES,
    QUANT_HELP,
    TRUST_REMOTE_CODE_HELP,
    load_for_inference,
)

OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.]*=")  # a config override, key=value (a path has no key before "=")
EVALUATIONS = {  # subcommand -> evaluators, in order
    "bpc": ("bpc",),
    "mc": ("mc",),
    "bench": ("bench",),
    "instruct": ("mc", "bench"),
    "parallel": ("parallel_bpc", "translation"),
    "harness": ("harness",),
}
OVERRIDES_EXAMPLE = {
    "mc": "mc.items_per_lang=500",
    "bench": "bench.do_sample=true judge.timeout_s=120",
    "instruct": "mc.items_per_lang=500 bench.max_new_tokens=256",
    "parallel": "parallel.split=dev parallel.translate_pairs=100",
    "harness": "harness.tasks=[tmmluplus_local] harness.tmmluplus_files=[a.csv]",
}
HELP = {
    "bpc": "bits per character of text files (final/* for a run, base/* for a base model)",
    "mc": "multiple choice in both languages (mc/*)",
    "bench": "the bench: rule scores, and the judge when configured (bench/*)",
    "instruct": "mc and bench, as the SFT stage evaluates",
    "parallel": "the TC-EN parallel set: bits/char of the same content, translation chrF (parallel/*, translation/*)",
    "harness": "lm-evaluation-harness on local tasks: held-out MC sets, TMMLU+ CSVs, TTQA (harness/*; '.[harness]')",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for --help) and one parser per subcommand."""
    parser = argparse.ArgumentParser(prog="python -m bailong.eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(EVALUATIONS) + "}")
    subs = {}
    for name in EVALUATIONS:
        sub = commands.add_parser(name, help=HELP[name], description=HELP[name])
        target_help = "run directory, adapter directory, or base model (directory or hub id)"
        if name == "bench":  # the served model needs no target
            sub.add_argument("target", nargs="?", help=target_help + "; none with --model-url")
        else:
            sub.add_argument("target", help=target_help)
        if name == "bpc":
            sub.add_argument("--tc", nargs="*", default=[], help="Traditional Chinese .txt/.jsonl(.gz) files")
            sub.add_argument("--en", nargs="*", default=[], help="English .txt/.jsonl(.gz) files")
            sub.add_argument("--text-field", default="text")
            sub.add_argument("--max-chars", type=int, default=None, help="cap per language (first documents)")
            sub.add_argument(
                "--seq-len", type=int, default=None, help="positions per scoring window (default: the model's limit)"
            )
            sub.add_argument("--batch-size", type=int, default=8)
        else:
            default = "the run directory" if name == "bench" else "<run dir>/instruct_eval"
            sub.add_argument("--out", help=f"output directory (default: {default})")
        if name in ("bench", "instruct"):
            sub.add_argument("--prompts", help="bench prompts JSONL (default: bench.prompts)")
            sub.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
            sub.add_argument("--judge-model", help="judge model name (default: judge.model)")
            sub.add_argument("--max-prompts", type=int)
        if name == "bench":
            sub.add_argument(
                "--model-url", help="answer through a served model's OpenAI-compatible base URL (bench.server.base_url)"
            )
            sub.add_argument("--model-name", help="the served model's name in requests (bench.server.model)")
        sub.add_argument("--quant", choices=QUANT_CHOICES, default="nf4", help=QUANT_HELP)
        sub.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
        sub.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
        if name != "bpc":
            sub.add_argument("overrides", nargs="*", help=f"config overrides, e.g. {OVERRIDES_EXAMPLE[name]}")
        subs[name] = sub
    return parser, subs


def held_out_texts(args: argparse.Namespace) -> dict[str, list[str]]:
    """The documents of ``--tc`` and ``--en``, each language capped at ``--max-chars``."""
    from bailong.data.config import CorpusConfig
    from bailong.data.corpus import load_documents
    from bailong.data.splits import cap_chars

    texts = {}
    for lang in ("tc", "en"):
        files = getattr(args, lang)
        if files:
            docs = load_documents([CorpusConfig(path=f, text_field=args.text_field) for f in files])
            texts[lang] = cap_chars(docs, args.max_chars)
    return texts


def bpc(args: argparse.Namespace, sub: argparse.ArgumentParser) -> dict:
    from bailong.eval.config import EvalConfig

    if not args.tc and not args.en:
        sub.error("give at least one file with --tc or --en")
    try:
        settings = EvalConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    except ConfigError as err:
        sub.error(str(err))  # eval.batch_size: --batch-size, eval.seq_len: --seq-len
    texts = held_out_texts(args)
    kind, model, tok = load_for_inference(
        args.target, quant=args.quant, device=args.device, trust_remote_code=args.trust_remote_code
    )
    # bpc writes no files: out_dir is never used
    ctx = EvalContext(model, tok, out_dir=Path.cwd(), texts=texts, eval=settings)
    return {f"{kind}/{k}": v for k, v in run_evaluators(EVALUATIONS["bpc"], ctx).items()}


def with_config(command: str, args: argparse.Namespace, sub: argparse.ArgumentParser) -> dict:
    """Every subcommand but ``bpc``: the composed config (with the overrides), then the evaluators."""
    from bailong.config import compose_config
    from bailong.eval.bench import is_run_dir, merge_metrics
    from bailong.redact import install_log_filter, run_secrets, secrets_from_env

    overrides = list(args.overrides)
    for flag, key in (
        ("prompts", "bench.prompts"),
        ("judge_url", "judge.base_url"),
        ("judge_model", "judge.model"),
        ("max_prompts", "bench.max_prompts"),
        ("model_url", "bench.server.base_url"),
        ("model_name", "bench.server.model"),
    ):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = compose_config(overrides)
    # no log line shows a key, wherever it came from (the served model's variable is not among run_secrets')
    secrets = {*run_secrets(cfg, overrides), *secrets_from_env([cfg.bench.server.api_key_env])}
    install_log_filter(sorted(secrets, key=len, reverse=True))  # longest first, as run_secrets orders them
    served = bool(cfg.bench.server.base_url)
    if served and command != "bench":
        sub.error("bench.server.base_url: only the bench subcommand answers through a served model")
    if served and args.target is not None:
        sub.error(f"give either a model to load ({args.target}) or --model-url (bench.server.base_url), not both")
    if args.target is None and not served:
        sub.error("give the model to evaluate (run directory, adapter or base model) or --model-url")
    target = Path(args.target) if args.target is not None else None
    is_run = target is not None and is_run_dir(target)
    if args.out is None and not is_run:
        what = "a served model" if served else f"{target} is not a run directory (no adapter/)"
        sub.error(f"{what}: give --out for the outputs")
    out = Path(args.out) if args.out else target if command == "bench" else target / "instruct_eval"
    try:  # the settings are checked before a model loads
        ctx = EvalContext.from_config(cfg, None, None, out)
    except ConfigError as err:
        sub.error(str(err))
    if not served:
        _, ctx.model, ctx.tokenizer = load_for_inference(
            target, quant=args.quant, device=args.device, trust_remote_code=args.trust_remote_code
        )
    metrics = run_evaluators(EVALUATIONS[command], ctx)
    if command == "bench" and is_run and args.out is None:
        merge_metrics(target, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    """Run one subcommand (``argv`` as on the command line, default ``sys.argv[1:]``); print and return its
    metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    if not argv or argv[0] not in subs:
        parser.parse_args(argv)  # --help, or the error naming the subcommands
        parser.error(f"the first argument must be one of {', '.join(subs)}")
    command, sub = argv[0], subs[argv[0]]
    args = sub.parse_intermixed_args(argv[1:])  # overrides may come before or after the options
    if getattr(args, "target", None) is not None and OVERRIDE.match(args.target) and not Path(args.target).exists():
        # bench's target is optional (a served model needs none): argparse gave it the first override
        args.overrides.insert(0, args.target)
        args.target = None
    result = bpc(args, sub) if command == "bpc" else with_config(command, args, sub)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
