"""Markdown tables of an ablation sweep, one row per value of the swept setting (the init strategy unless ``--by``
says another), mean ± std over seeds: base, step-0 and final bits/char on the test split, and (``--curve``) a dev
curve at every validated step.

    python run.py experiment=ablation_init          # or: python run.py -m init=... seed=1,2,3
    python experiments/init_table.py outputs/ablation_init/multirun/<sweep> [more sweeps]
    python experiments/init_table.py --curve val/tc_bpc outputs/ablation_init/multirun/<sweep> [more sweeps]
    python experiments/init_table.py --by lora.r outputs/ablation_rank/multirun/<sweep>

Several sweeps make one table; a (value, seed) run again in a later sweep replaces the earlier run. The rows
are ordered by final TC bits/char; choices were made on dev (``val/*``, ``final/tc_bpc``), the first table is test.
The curve starts at step 0 (``step0/<name>``, the same dev text as ``val/<name>``); with one tokenizer and model for
every strategy, a step is the same TC characters and about the same training time for each (``init s``: the
strategy's own time to compute its rows, once per seed, from ``init_report.json``). Across tokenizers (``--by
tokenizer.added_vocab``) a step is not the same characters: the dashboard draws those curves against TC characters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bailong.dashboard.collect import Run, collect_runs, curve_points  # noqa: E402
from bailong.dashboard.table import aggregate, format_stat, group_runs  # noqa: E402

COLUMNS = [
    "base/test_tc_bpc",
    "step0/test_tc_bpc",
    "final/test_tc_bpc",
    "base/test_en_bpc",
    "step0/test_en_bpc",
    "final/test_en_bpc",
]


def finished_runs(sweeps: list[Path], by: str = "init") -> list[Run]:
    """The finished runs of ``sweeps``, one per (value of ``by``, seed): a later sweep's run replaces an earlier one."""
    latest = {}
    for sweep in sweeps:
        for run in collect_runs([sweep]):
            if run.status == "ok":
                latest[(str(run.value(by)), run.value("seed"))] = run
    return list(latest.values())


def cell(values: list[float]) -> str:
    """Mean ± sample std over seeds, as the dashboard's table writes it."""
    return format_stat(aggregate([{"value": v} for v in values]).get("value"), 3)


def grouped(runs: list[Run], by: str = "init") -> dict[str, list[Run]]:
    """The runs by their value of ``by`` (the dashboard's grouping), in order of mean final test TC bits/char (best
    first)."""
    final = COLUMNS[2]
    groups = sorted(group_runs(runs, [by]), key=lambda g: g.stats[final].mean if final in g.stats else float("inf"))
    return {str(g.values[by]): g.runs for g in groups}


def table(runs: list[Run], by: str = "init") -> str:
    lines = [f"| {by} | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for value, group in grouped(runs, by).items():
        cells = [cell([r.metrics[c] for r in group if c in r.metrics]) for c in COLUMNS]
        lines.append(f"| {value} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def init_seconds(run: Run) -> float | None:
    report = run.path / "init_report.json"
    return json.loads(report.read_text()).get("seconds") if report.is_file() else None


def curve_table(runs: list[Run], key: str, by: str = "init") -> str:
    """``key`` (a ``val/*`` metric) per value of ``by`` at step 0 and every validated step, mean ± std over seeds."""
    start = "step0/" + key.split("/", 1)[1]
    groups = grouped(runs, by)
    points: dict[str, dict[float, list[float]]] = {name: {} for name in groups}
    for name, group in groups.items():
        for run in group:
            if start in run.metrics:
                points[name].setdefault(0.0, []).append(run.metrics[start])
            for steps, value in curve_points(run, key):
                points[name].setdefault(steps, []).append(value)
    steps = sorted({s for at in points.values() for s in at})
    lines = [f"| {by} | init s | " + " | ".join(f"{s:g}" for s in steps) + " |", "|---" * (len(steps) + 2) + "|"]
    for name, at in points.items():
        seconds = [s for s in map(init_seconds, groups[name]) if s is not None]
        spent = f"{statistics.fmean(seconds):.0f}" if seconds else "–"
        lines.append(f"| {name} | {spent} | " + " | ".join(cell(at.get(s, [])) for s in steps) + " |")
    return f"{key} after n steps (n = 0: step0)\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--curve", default=None, help="a val/* key: the dev curve instead of the test table")
    parser.add_argument("--by", default="init", help="the swept setting, e.g. lora.r, tokenizer.added_vocab")
    args = parser.parse_args()
    runs = finished_runs(args.sweeps, args.by)
    print(curve_table(runs, args.curve, args.by) if args.curve else table(runs, args.by))


if __name__ == "__main__":
    main()
