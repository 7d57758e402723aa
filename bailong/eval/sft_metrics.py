"""The instruction-following evaluation of one model, as flat metrics: multiple choice in both languages
and the bench (rules, and the judge when configured): the ``mc`` and ``bench`` evaluators of
``bailong.eval.evaluators``. From the command line, on a run directory, an adapter or a base model::

    python -m bailong.eval instruct outputs/pretrain/runs/<run>        # writes <run>/instruct_eval/
    python -m bailong.eval mc models/mini-base --out /tmp/base_eval    # multiple choice only

Keys (all floats): ``mc/tc_acc``, ``mc/en_acc`` (+ ``_acc_stderr``, ``_chance``, ``_n``; one more set per
file in ``mc.files``: ``mc/<file stem>_acc``), ``bench/lang_consistency``, ``bench/traditional_purity``,
``bench/<lang or category>/...``, and ``bench/judge_score`` when ``judge.base_url`` is set. Callers add
their own prefix (``sft/``, ``base/``) if they need one.

Files under ``out_dir``: ``mc/<set>.jsonl`` (the items, MC file format), ``mc/<set>_predictions.jsonl``
(per-choice bits/char), ``bench/generations.jsonl``, ``bench/judgments.jsonl``, ``bench/metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bailong.eval.evaluators import EvalContext, run_evaluators

INSTRUCT_EVALUATORS = ("mc", "bench")


def evaluate_instruct(
    model: Any, tokenizer: Any, cfg: Any, out_dir: str | Path, *, bench: bool = True
) -> dict[str, float]:
    """MC accuracy (TC, EN) and (``bench``) bench scores of ``model`` with ``tokenizer``: ``run_evaluators`` of
    ``mc`` and ``bench`` on ``EvalContext.from_config(cfg, ...)``. ``cfg`` is the composed experiment config."""
    names = INSTRUCT_EVALUATORS if bench else ("mc",)
    return run_evaluators(names, EvalContext.from_config(cfg, model, tokenizer, out_dir))
