"""Markdown table of the init strategies of a sweep on the test split: base, step-0 and final bits/char, mean ± std
over seeds.

    python run.py experiment=ablation_init          # or: python run.py -m init=... seed=1,2,3
    python experiments/init_table.py outputs/ablation_init/multirun/<sweep> [more sweeps]

Several sweeps make one table; a (strategy, seed) run again in a later sweep replaces the earlier run. The rows
are ordered by final TC bits/char; choices were made on dev (``val/*``, ``final/tc_bpc``), the table is test.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

COLUMNS = [
    "base/test_tc_bpc",
    "step0/test_tc_bpc",
    "final/test_tc_bpc",
    "base/test_en_bpc",
    "step0/test_en_bpc",
    "final/test_en_bpc",
]


def rows(sweep: Path) -> list[dict]:
    """Each finished run's metrics, with its ``seed`` from the run's composed config."""
    out = []
    for path in sorted(sweep.glob("*/metrics.json")):
        config = yaml.safe_load((path.parent / ".hydra" / "config.yaml").read_text())
        out.append({**json.loads(path.read_text()), "seed": config["seed"]})
    return out


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[dict]) -> str:
    by_init: dict[str, list[dict]] = {}
    for m in runs:
        by_init.setdefault(m["init/strategy"], []).append(m)
    lines = ["| init | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    final = COLUMNS[2]
    for init, ms in sorted(by_init.items(), key=lambda kv: statistics.fmean(m.get(final, float("inf")) for m in kv[1])):
        cells = [cell([m[c] for m in ms if c in m]) for c in COLUMNS]
        lines.append(f"| {init} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    latest = {(m["init/strategy"], m["seed"]): m for arg in sys.argv[1:] for m in rows(Path(arg))}
    print(table(list(latest.values())))
