"""The results table: runs grouped by their swept values, mean ± std over seeds, as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .collect import Run

SEED_KEYS = ("seed",)  # swept, but averaged over rather than grouped by

# (metrics.json key, heading, decimals). Bits/char compare across tokenizers; losses do not. The test split's
# figures are the reported ones; dev's (every choice is made on them) follow.
COLUMNS = [
    ("final/test_tc_bpc", "TC bits/char, final (test)", 3),
    ("step0/test_tc_bpc", "TC bits/char, step 0 (test)", 3),
    ("base/test_tc_bpc", "TC bits/char, base (test)", 3),
    ("final/test_en_bpc", "EN bits/char, final (test)", 3),
    ("final/tc_bpc", "TC bits/char, final (dev)", 3),
    ("step0/tc_bpc", "TC bits/char, step 0 (dev)", 3),
    ("base/tc_bpc", "TC bits/char, base (dev)", 3),
    ("final/en_bpc", "EN bits/char, final (dev)", 3),
    ("step0/en_bpc", "EN bits/char, step 0 (dev)", 3),
    ("tokenizer/tc_tokens_per_char", "TC tokens/char", 3),
    ("params/trainable", "trainable params", 0),
    ("train/tokens_per_sec", "tokens/s", 0),
]


@dataclass
class Stat:
    mean: float
    std: float | None  # sample standard deviation over seeds; None for a single run
    n: int


@dataclass
class Group:
    values: dict[str, Any]  # swept key -> value shared by the group's runs
    runs: list[Run] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs, in the order they first appear."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    return [k for k in keys if len({repr(r.value(k)) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str] | None = None) -> list[Group]:
    """One group per combination of the swept values other than the seed, in sweep order."""
    keys = [k for k in (swept_keys(runs) if keys is None else keys) if k not in SEED_KEYS]
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = {k: run.value(k) for k in keys}
        groups.setdefault(tuple(repr(v) for v in values.values()), Group(values)).runs.append(run)
    for group in groups.values():
        group.stats = aggregate([r.metrics for r in group.runs if r.status == "ok"])
    return list(groups.values())


def aggregate(metrics: list[dict]) -> dict[str, Stat]:
    stats = {}
    for key in dict.fromkeys(k for m in metrics for k in m):
        values = [m[key] for m in metrics if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
        values = [float(v) for v in values if math.isfinite(v)]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else None
            stats[key] = Stat(statistics.fmean(values), std, len(values))
    return stats


def best_group(groups: list[Group], metric: str) -> Group | None:
    """The group with the lowest mean ``metric`` (bits/char: lower is better)."""
    scored = [g for g in groups if metric in g.stats]
    return min(scored, key=lambda g: g.stats[metric].mean) if len(scored) > 1 else None


def format_stat(stat: Stat | None, decimals: int) -> str:
    if stat is None:
        return "–"
    mean = f"{stat.mean:,.{decimals}f}"
    if stat.std is None or (decimals == 0 and stat.std == 0):  # a count that is the same in every seed
        return mean
    return f"{mean} ± {stat.std:,.{decimals}f}"


def runs_cell(group: Group) -> str:
    cell = f"{group.count('ok')}"
    for status in ("failed", "incomplete"):
        if group.count(status):
            cell += f" + {group.count(status)} {status}"
    return cell


def present_columns(groups: list[Group]) -> list[tuple[str, str, int]]:
    return [c for c in COLUMNS if any(c[0] in g.stats for g in groups)]


def to_markdown(groups: list[Group], metric: str) -> str:
    keys = list(groups[0].values) if groups else []
    columns = present_columns(groups)
    best = best_group(groups, metric)
    lines = [
        "| " + " | ".join([*keys, "runs", *(c[0] for c in columns)]) + " |",
        "|" + "---|" * (len(keys) + 1) + "---:|" * len(columns),
    ]
    for group in groups:
        cells = [str(v) for v in group.values.values()] + [runs_cell(group)]
        for key, _, decimals in columns:
            text = format_stat(group.stats.get(key), decimals)
            cells.append(f"**{text}**" if group is best and key == metric else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(groups: list[Group]) -> str:
    keys = list(groups[0].values) if groups else []
    columns = present_columns(groups)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            *keys,
            "runs_ok",
            "runs_failed",
            "runs_incomplete",
            *(f"{key} {part}" for key, _, _ in columns for part in ("mean", "std")),
        ]
    )
    for group in groups:
        row: list[Any] = [*group.values.values(), group.count("ok"), group.count("failed"), group.count("incomplete")]
        for key, _, _ in columns:
            stat = group.stats.get(key)
            row += [stat.mean if stat else "", stat.std if stat and stat.std is not None else ""]
        writer.writerow(row)
    return buf.getvalue()
