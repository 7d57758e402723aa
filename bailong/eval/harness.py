"""lm-evaluation-harness on a bailong model: ``harness`` (``python -m bailong.eval harness <target>``).

Optional (``pip install -e '.[harness]'``). The tasks are the YAMLs of bailong/eval/harness_tasks/, copied with
their ``data_files`` set to local files, so nothing is fetched: ``bailong_mc_tc`` and ``bailong_mc_en`` are the
held-out multiple-choice sets the ``mc`` evaluator scores (built from the ``mc`` settings), ``tmmluplus_local``
TMMLU+-layout CSV files (``harness.tmmluplus_files``), ``ttqa_local`` TTQA-layout JSON files (``harness.ttqa_files``;
open-ended, scored by ``harness_tasks/ttqa_utils.py``). The model is handed to lm-eval's ``HFLM`` as loaded (a
run's adapter on its 4-bit base, an export, a base), with a BOS before every context as bailong scores.

Keys: ``harness/<task>_acc`` and, for multiple choice, ``_acc_norm`` (with ``_stderr``). ``acc_norm`` divides
each choice's log-likelihood by its characters, bailong's own rule, but lm-eval moves the question's trailing
newline into the scored continuation: every choice of an item gets the same extra term, the newline's
log-likelihood, which changes the per-character ranking only between choices of different lengths
(docs/bilingual_eval.md measures it). Writes ``harness/results.json`` and per item
``harness/samples_<task>.jsonl``: the choices' log-likelihoods, or the generated answer of an open-ended task.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from bailong.cache import default_cache_dir
from bailong.data.corpus import write_jsonl
from bailong.eval.choice import write_mc_file
from bailong.eval.evaluators import EvalContext, Evaluator, register_evaluator
from bailong.eval.mc_sets import build_mc_sets

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).parent / "harness_tasks"
# the tasks read from the user's local files: {task: (setting listing the files, what the files must be)}
LOCAL_FILE_TASKS = {
    "tmmluplus_local": ("tmmluplus_files", "CSV files (question,A,B,C,D,answer)"),
    "ttqa_local": ("ttqa_files", "JSON files ([{examples, correct_answers}, ...])"),
}


class FunctionRef(str):
    """A task YAML's ``!function module.name`` (lm-eval's tag for code beside the YAML), kept as written."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_TaskDumper.add_representer(FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_config(template: str, name: str, data_files: str | list[str]) -> dict:
    """The shipped task YAML ``template`` named ``name``, reading ``data_files``."""
    config = yaml.load((TASKS_DIR / f"{template}.yaml").read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506
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
    for task, (setting, expected) in LOCAL_FILE_TASKS.items():
        if task in settings.tasks:
            files = [str(Path(f).resolve()) for f in getattr(settings, setting)]
            missing = [f for f in files if not Path(f).is_file()]
            if not files or missing:
                raise FileNotFoundError(
                    f"harness.{setting}: {missing or 'none given'}: {task} needs local {expected}; "
                    "nothing is downloaded"
                )
            configs[task] = task_config(task, task, files)
    for task, config in configs.items():
        text = yaml.dump(config, Dumper=_TaskDumper, allow_unicode=True, sort_keys=False)
        (tasks_dir / f"{task}.yaml").write_text(text, encoding="utf-8")
    for code in TASKS_DIR.glob("*.py"):  # what a !function names, which lm-eval imports from beside the YAML
        shutil.copyfile(code, tasks_dir / code.name)
    return tasks_dir


def sample_record(sample: dict) -> dict:
    """One item of lm-eval's log: its target and the choices' log-likelihoods, or the generated answer."""
    record = {"doc_id": sample["doc_id"], "target": sample["target"]}
    responses = sample["filtered_resps"]
    if responses and isinstance(responses[0], str):  # generate_until
        return record | {"response": responses[0]}
    return record | {"loglikelihoods": [r[0] for r in responses]}


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
            for key, value in results["results"][task].items():  # "acc,none", "acc_stderr,none", ...
                metric = key.partition(",")[0]
                if metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") and isinstance(value, int | float):
                    metrics[f"harness/{task}_{metric}"] = float(value)
            metrics[f"harness/{task}_n"] = float(len(results["samples"][task]))
            write_jsonl((sample_record(s) for s in results["samples"][task]), out / f"samples_{task}.jsonl")
        (out / "results.json").write_text(json.dumps(results["results"], indent=2, ensure_ascii=False, default=str))
        log.info("harness: %s", {k: round(v, 4) for k, v in metrics.items() if k.endswith(("_acc", "_acc_norm"))})
        return metrics
