"""The instruction-following evaluation of one model, as flat metrics: multiple choice in both languages
and the bench (rules, and the judge when configured). The SFT stage calls it before and after training;
the same from the command line, on a run directory, an adapter or a base model (its own tokenizer)::

    python -m bailong.eval.sft_metrics outputs/pretrain/runs/<run>            # writes <run>/instruct_eval/
    python -m bailong.eval.sft_metrics models/mini-base --out /tmp/base_eval --skip-bench
    python -m bailong.eval.sft_metrics <run> "mc.files=[my_mc.jsonl]" judge.base_url=http://127.0.0.1:8000/v1

Keys (all floats): ``mc/tc_acc``, ``mc/en_acc`` (+ ``_acc_stderr``, ``_chance``, ``_n``; one more set per
file in ``mc.files``: ``mc/<file stem>_acc``), ``bench/lang_consistency``, ``bench/traditional_purity``,
``bench/<lang or category>/...``, and ``bench/judge_score`` when ``judge.base_url`` is set. Callers add
their own prefix (``sft/``, ``base/``) if they need one.

Files under ``out_dir``: ``mc/<set>.jsonl`` (the items, MC file format), ``mc/<set>_predictions.jsonl``
(per-choice bits/char), ``bench/generations.jsonl``, ``bench/judgments.jsonl``, ``bench/metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bailong.data.corpus import write_jsonl
from bailong.eval.bench import run_bench
from bailong.eval.choice import load_mc_file, score_choices, write_mc_file
from bailong.eval.mc_sets import build_mc_sets

log = logging.getLogger(__name__)


def mc_metrics(model: Any, tokenizer: Any, cfg: Any, out_dir: Path) -> dict[str, float]:
    """Accuracy on the held-out sets of ``cfg.mc`` (split as ``cfg.data`` splits pre-training) and on
    ``cfg.mc.files``."""
    sets = build_mc_sets(cfg.mc, cfg.data)
    for name, items in sets.items():
        write_mc_file(items, out_dir / "mc" / f"{name}.jsonl")
    for file in cfg.mc.files:
        name = Path(file).name.split(".")[0]
        if name in sets:
            raise ValueError(
                f"mc.files: {file} would be reported as mc/{name}_acc, which a generated set uses; rename it"
            )
        sets[name] = load_mc_file(file)
    metrics: dict[str, float] = {}
    for name, items in sets.items():
        result = score_choices(model, tokenizer, items, max_len=cfg.mc.max_len, batch_size=cfg.mc.batch_size)
        metrics.update(result.metrics(f"mc/{name}"))
        write_jsonl(result.predictions, out_dir / "mc" / f"{name}_predictions.jsonl")
        log.info("mc/%s: accuracy %.3f over %d items (chance %.3f)", name, result.accuracy, result.n, result.chance)
    return metrics


def evaluate_instruct(
    model: Any, tokenizer: Any, cfg: Any, out_dir: str | Path, *, bench: bool = True
) -> dict[str, float]:
    """MC accuracy (TC, EN) and bench scores of ``model`` (plain or peft, 4-bit or not) with ``tokenizer``.

    ``cfg`` is the experiment config: ``cfg.mc``, ``cfg.bench``, ``cfg.judge`` and ``cfg.data`` (whose
    ``val_fraction``/``split_seed`` name the held-out documents the MC sets are made from). A tokenizer
    without a chat template is prompted in ``bailong.eval.generate``'s plain format.
    """
    out = Path(out_dir)
    (out / "mc").mkdir(parents=True, exist_ok=True)
    metrics = mc_metrics(model, tokenizer, cfg, out)
    if bench:
        metrics.update(run_bench(model, tokenizer, cfg.bench, cfg.judge, out / "bench"))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from bailong.config import compose_config
    from bailong.eval.__main__ import DEVICE_CHOICES, DEVICE_HELP, TRUST_REMOTE_CODE_HELP, load_target
    from bailong.eval.bench import is_run_dir
    from bailong.redact import install_log_filter, run_secrets

    ap = argparse.ArgumentParser(prog="python -m bailong.eval.sft_metrics", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="run directory, adapter directory, or base model directory")
    ap.add_argument("--out", help="output directory (default: <run dir>/instruct_eval)")
    ap.add_argument("--skip-bench", action="store_true", help="multiple choice only")
    ap.add_argument("--quant", choices=["nf4", "none"], default="nf4", help="for a base model")
    ap.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    ap.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. mc.items_per_lang=500")
    args = ap.parse_intermixed_args(argv)
    target = Path(args.target)
    if args.out is None and not is_run_dir(target):
        ap.error(f"{target} is not a run directory (no adapter/): give --out for the outputs")
    cfg = compose_config(args.overrides)
    install_log_filter(run_secrets(cfg, args.overrides))  # no log line shows a key, wherever it came from
    _, model, tokenizer = load_target(str(target), args.quant, args.device, args.trust_remote_code)
    metrics = evaluate_instruct(
        model, tokenizer, cfg, Path(args.out) if args.out else target / "instruct_eval", bench=not args.skip_bench
    )
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
