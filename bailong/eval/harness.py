"""lm-evaluation-harness on a bailong model: ``harness`` (``python -m bailong.eval harness <target>``).

Optional (``pip install -e '.[harness]'``). The tasks are the YAMLs of bailong/eval/harness_tasks/, copied with
their ``data_files`` set to local files, so nothing is fetched: ``bailong_mc_tc`` and ``bailong_mc_en`` are the
held-out multiple-choice sets the ``mc`` evaluator scores (built from the ``mc`` settings), ``tmmluplus_local``
TMMLU+-layout CSV files (``harness.tmmluplus_files``). The model is handed to lm-eval's ``HFLM`` as loaded (a
run's adapter on its 4-bit base, an export, a base), with a BOS before every context as bailong scores.

Keys: ``harness/<task>_acc`` and ``_acc_norm`` (with ``_stderr``). ``acc_norm`` divides each choice's
log-likelihood by its characters, bailong's own rule, but lm-eval moves the question's trailing newline into the
scored continuation: every choice of an item gets the same extra term, the newline's log-likelihood, which
changes the per-character ranking only between choices of different lengths (docs/bilingual_eval.md measures
it). Writes ``harness/results.json`` and the per-item log-likelihoods ``harness/samples_<task>.jsonl``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from bailong.cache import default_cache_dir
from bailong.data.corpus import write_jsonl
from bailong.eval.choice import write_mc_file
from bailong.eval.evaluators import EvalContext, Evaluator, register_evaluator
from bailong.eval.mc_sets import build_mc_sets

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).parent / "harness_tasks"


def task_config(template: str, name: str, data_files: str | list[str]) -> dict:
    """The shipped task YAML ``template`` named ``name``, reading ``data_files``."""
    config = yaml.safe_load((TASKS_DIR / f"{template}.yaml").read_text(encoding="utf-8"))
    config["task"] = name
    config["dataset_kwargs"]["data_files"] = {"test": data_files}
    return config


def write_tasks(ctx: EvalContext, out: Path) -> Path:
    """The task YAMLs of ``ctx.harness.tasks`` under ``out/tasks`` with their local data files (the MC sets are
    written beside them first)."""
    tasks_dir = out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    settings, configs = ctx.harness, {}
    mc_tasks = [t for t in settings.tasks if t.startswith("bailong_mc_")]
    if mc_tasks:
        if ctx.data is None:
            raise ValueError("harness: the bailong_mc tasks need the data config their items come from")
        cache_dir = ctx.cache_dir if ctx.cache_dir is not None else default_cache_dir()
        sets = build_mc_sets(ctx.mc, data=ctx.data, cache_dir=cache_dir)
        for task in mc_tasks:
            path = write_mc_file(sets[task.removeprefix("bailong_mc_")], out / f"{task}.jsonl")
            configs[task] = task_config("bailong_mc", task, str(path.resolve()))
    if "tmmluplus_local" in settings.tasks:
        files = [str(Path(f).resolve()) for f in settings.tmmluplus_files]
        missing = [f for f in files if not Path(f).is_file()]
        if not files or missing:
            raise FileNotFoundError(
                f"harness.tmmluplus_files: {missing or 'none given'}: tmmluplus_local needs local CSV files "
                "(question,A,B,C,D,answer); nothing is downloaded"
            )
        configs["tmmluplus_local"] = task_config("tmmluplus_local", "tmmluplus_local", files)
    for task, config in configs.items():
        (tasks_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return tasks_dir


@register_evaluator
class Harness(Evaluator):
    """lm-evaluation-harness accuracy on local tasks."""

    name = "harness"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError as err:
            raise ImportError(f"the harness evaluation needs lm-eval: pip install -e '.[harness]' ({err})") from None
        settings, out = ctx.harness, ctx.out_dir / "harness"
        tasks_dir = write_tasks(ctx, out)
        model = HFLM(
            pretrained=ctx.model,
            tokenizer=ctx.tokenizer,
            batch_size=settings.batch_size,
            add_bos_token=True,
            max_length=ctx.mc.max_len,
        )
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=list(settings.tasks),
            task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        metrics = {}
        for task in settings.tasks:
            scores = results["results"][task]
            for key in ("acc", "acc_norm"):
                metrics[f"harness/{task}_{key}"] = float(scores[f"{key},none"])
                metrics[f"harness/{task}_{key}_stderr"] = float(scores[f"{key}_stderr,none"])
            metrics[f"harness/{task}_n"] = float(len(results["samples"][task]))
            write_jsonl(
                (
                    {
                        "doc_id": s["doc_id"],
                        "target": s["target"],
                        "loglikelihoods": [r[0] for r in s["filtered_resps"]],
                    }
                    for s in results["samples"][task]
                ),
                out / f"samples_{task}.jsonl",
            )
        (out / "results.json").write_text(json.dumps(results["results"], indent=2, ensure_ascii=False, default=str))
        log.info("harness: %s", {k: round(v, 4) for k, v in metrics.items() if k.endswith(("_acc", "_acc_norm"))})
        return metrics
