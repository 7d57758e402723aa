"""Evaluations by name: each is a small ``Evaluator`` class registered with ``@register_evaluator``, run by
``run_evaluators(names, ctx)`` on an ``EvalContext`` (the model, its tokenizer, where files go, the typed
settings). The stages and ``python -m bailong.eval`` all run evaluations through here.

Built in: ``bpc`` (held-out text per language: ``tc_bpc``, ``tc_bpb``, ...), ``mc`` (multiple choice:
``mc/*``), ``bench`` (rules and the judge: ``bench/*``), ``chat_bpc`` (held-out chat answers).

A new evaluation is one new module in bailong/eval/::

    from bailong.eval.evaluators import EvalContext, Evaluator, register_evaluator

    @register_evaluator
    class Perplexity(Evaluator):
        name = "ppl"

        def __call__(self, ctx: EvalContext) -> dict[str, float]:
            ...

plus its import line in bailong/eval/__init__.py, which loads every registered evaluator with the package.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bailong.cache import default_cache_dir
from bailong.data.config import DataConfig
from bailong.data.corpus import write_jsonl
from bailong.eval.bench import run_bench
from bailong.eval.bpc import evaluate_texts, score_windows, scoring_mode
from bailong.eval.choice import load_mc_file, score_choices, write_mc_file
from bailong.eval.config import BenchConfig, EvalConfig, HarnessConfig, JudgeConfig, MCConfig, ParallelConfig
from bailong.eval.mc_sets import build_mc_sets

log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What an evaluator may use: the model (plain or peft, 4-bit or not) and its tokenizer, the directory its
    files go under, the held-out inputs, and the typed settings (never the raw Hydra config)."""

    model: Any
    tokenizer: Any
    out_dir: Path
    texts: dict[str, list[str]] | None = None  # held-out text per language (bpc)
    chat_batches: Callable[[], Iterable[dict]] | None = None  # batches of held-out chat windows (chat_bpc)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mc: MCConfig = field(default_factory=MCConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    data: DataConfig | None = None  # data.*: mc's items are the test split of its prepared text
    cache_dir: Path | None = None  # paths.cache_dir: where that text is prepared (None: the project's cache)

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        model: Any,
        tokenizer: Any,
        out_dir: str | Path,
        *,
        texts: dict[str, list[str]] | None = None,
        chat_batches: Callable[[], Iterable[dict]] | None = None,
    ) -> EvalContext:
        """A context from the composed experiment config (``eval``, ``mc``, ``bench``, ``judge``, ``data``),
        converted to the typed settings once here (their ``__post_init__`` checks the ranges)."""
        from omegaconf import OmegaConf

        return cls(
            model=model,
            tokenizer=tokenizer,
            out_dir=Path(out_dir),
            texts=texts,
            chat_batches=chat_batches,
            eval=OmegaConf.to_object(cfg.eval),
            mc=OmegaConf.to_object(cfg.mc),
            bench=OmegaConf.to_object(cfg.bench),
            judge=OmegaConf.to_object(cfg.judge),
            parallel=OmegaConf.to_object(cfg.parallel),
            harness=OmegaConf.to_object(cfg.harness),
            data=OmegaConf.to_object(cfg.data),
            cache_dir=Path(cfg.paths.cache_dir),
        )


class Evaluator(ABC):
    """One evaluation: ``name`` is what ``run_evaluators`` is asked for; calling it returns flat float metrics."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        """The metrics of ``ctx.model`` (keys as they go into metrics.json, before any caller's prefix)."""


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: ``cls`` runs when ``run_evaluators`` is asked for ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__}: an evaluator needs a class attribute name = '...'")
    if name in EVALUATORS and EVALUATORS[name] is not cls:
        raise ValueError(f"evaluator {name!r} is registered twice: {EVALUATORS[name].__qualname__}, {cls.__qualname__}")
    EVALUATORS[name] = cls
    return cls


def run_evaluators(names: Sequence[str], ctx: EvalContext) -> dict[str, float]:
    """Run the evaluators ``names`` in order on ``ctx``; their metrics merged into one dict (a later one's key
    wins). An unknown name fails before any runs."""
    if isinstance(names, str):
        raise TypeError(f"names: expected a list of evaluator names, got the string {names!r}")
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluator {', '.join(map(repr, unknown))}: registered are {', '.join(EVALUATORS)}")
    metrics: dict[str, float] = {}
    for name in names:
        metrics.update(EVALUATORS[name]()(ctx))
    return metrics


@register_evaluator
class BitsPerChar(Evaluator):
    """Bits per character (and byte) of each language's held-out text: ``<lang>_bpc``, ``<lang>_bpb``, ..."""

    name = "bpc"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        if ctx.texts is None:
            raise ValueError("the bpc evaluator needs held-out text: EvalContext(texts={'tc': [...], ...})")
        return evaluate_texts(
            ctx.model, ctx.tokenizer, ctx.texts, seq_len=ctx.eval.seq_len, batch_size=ctx.eval.batch_size
        )


@register_evaluator
class MultipleChoice(Evaluator):
    """Accuracy on the sets ``mc`` makes of the test split of ``data`` (bailong/eval/mc_sets.py) and on ``mc.files``:
    ``mc/<set>_acc`` (+ ``_acc_stderr``, ``_chance``, ``_n``). Writes ``mc/<set>.jsonl`` (the items) and
    ``mc/<set>_predictions.jsonl`` under ``out_dir``."""

    name = "mc"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        out = ctx.out_dir / "mc"
        out.mkdir(parents=True, exist_ok=True)
        if ctx.data is None:
            raise ValueError("the mc evaluator needs the data config its items come from: EvalContext(data=...)")
        cache_dir = ctx.cache_dir if ctx.cache_dir is not None else default_cache_dir()
        sets = build_mc_sets(ctx.mc, data=ctx.data, cache_dir=cache_dir)
        for name, items in sets.items():
            write_mc_file(items, out / f"{name}.jsonl")
        for file in ctx.mc.files:
            name = Path(file).name.split(".")[0]
            if name in sets:
                raise ValueError(
                    f"mc.files: {file} would be reported as mc/{name}_acc, which a generated set uses; rename it"
                )
            sets[name] = load_mc_file(file)
        metrics: dict[str, float] = {}
        for name, items in sets.items():
            result = score_choices(
                ctx.model, ctx.tokenizer, items, max_len=ctx.mc.max_len, batch_size=ctx.mc.batch_size
            )
            metrics.update(result.metrics(f"mc/{name}"))
            write_jsonl(result.predictions, out / f"{name}_predictions.jsonl")
            log.info("mc/%s: accuracy %.3f over %d items (chance %.3f)", name, result.accuracy, result.n, result.chance)
        return metrics


@register_evaluator
class Bench(Evaluator):
    """The bench's rule scores and, when ``judge.base_url`` is set, the judge's: ``bench/*``. Writes
    ``bench/generations.jsonl``, ``bench/judgments.jsonl``, ``bench/metrics.json`` under ``out_dir``."""

    name = "bench"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        return run_bench(ctx.model, ctx.tokenizer, ctx.bench, ctx.judge, ctx.out_dir / "bench")


@register_evaluator
class ChatBitsPerChar(Evaluator):
    """Bits per character of held-out chat answers: ``chat_bpc``; nothing when there is no chat data."""

    name = "chat_bpc"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        if ctx.chat_batches is None:
            return {}
        with scoring_mode(ctx.model):
            return {"chat_bpc": score_windows(ctx.model, ctx.chat_batches())["bpc"]}
