"""Markdown table of the init strategies of a sweep: base, step-0 and final bits/char.

    python run.py -m init=random,mean,multivariate,subword_mean,zip_tie,distill trainer.max_steps=100
    python experiments/init_table.py outputs/pretrain/multirun/<sweep> [more sweeps]

Several sweeps make one table; a strategy run again in a later sweep replaces the earlier run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ["base/tc_bpc", "step0/tc_bpc", "final/tc_bpc", "base/en_bpc", "step0/en_bpc", "final/en_bpc"]


def rows(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]


def table(runs: list[dict]) -> str:
    lines = ["| init | " + " | ".join(COLUMNS) + " | train/steps |", "|---" * (len(COLUMNS) + 2) + "|"]
    for m in sorted(runs, key=lambda m: m.get("step0/tc_bpc", float("inf"))):
        cells = [f"{m[c]:.3f}" if c in m else "–" for c in COLUMNS]
        lines.append(f"| {m['init/strategy']} | " + " | ".join(cells) + f" | {m.get('train/steps', '–')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    latest = {m["init/strategy"]: m for arg in sys.argv[1:] for m in rows(Path(arg))}
    print(table(list(latest.values())))
