"""The short table that ends a run's console output; ``metrics.json`` in the run directory has every number.

Pre-training fills the base / step 0 / final rows, SFT the before / after rows: a row or column without any
value in ``metrics`` is left out, so either stage (or one that skipped an evaluation) gets a table.
"""

from __future__ import annotations

import os
from pathlib import Path

from bailong.run_files import ADAPTER_DIR, CSV_METRICS, METRICS_FILE

# (label, metrics-key prefix), in the order a run computes them
ROWS = [
    ("base", "base/"),
    ("step 0", "step0/"),
    ("final", "final/"),
    ("before SFT", "sft/before/"),
    ("after SFT", "sft/after/"),
]
# (header, metrics-key suffix)
COLUMNS = [
    ("TC bpc", "tc_bpc"),
    ("EN bpc", "en_bpc"),
    ("chat bpc", "chat_bpc"),
    ("TC tokens/char", "tc_tokens_per_char"),
]
OUTPUT_FILES = [METRICS_FILE, f"{ADAPTER_DIR}/", CSV_METRICS]
LABEL_WIDTH = 22


def run_summary(metrics: dict, out: Path) -> str:
    """The table, then trainable parameters, steps and throughput, the run directory's main outputs and, for an
    offline W&B run, the command that uploads it."""
    lines = ["run summary", *metric_table(metrics)]
    lines += [f"  {label:<{LABEL_WIDTH}}{value}" for label, value in run_facts(metrics, out)]
    return "\n".join(lines)


def metric_table(metrics: dict) -> list[str]:
    """Rows base / step 0 / final (or before / after SFT) by bits/char and tokens/char; only what was measured."""
    columns = [
        (header, suffix)
        for header, suffix in COLUMNS
        if any(is_number(metrics.get(prefix + suffix)) for _, prefix in ROWS)
    ]
    rows = [
        (label, prefix)
        for label, prefix in ROWS
        if any(is_number(metrics.get(prefix + suffix)) for _, suffix in columns)
    ]
    if not rows:
        return []
    widths = [max(len(header), 7) for header, _ in columns]
    lines = [table_line("", [header for header, _ in columns], widths)]
    for label, prefix in rows:
        lines.append(table_line(label, [cell(metrics.get(prefix + suffix)) for _, suffix in columns], widths))
    return lines


def table_line(label: str, cells: list[str], widths: list[int]) -> str:
    return f"  {label:<{LABEL_WIDTH}}" + "  ".join(f"{text:>{width}}" for text, width in zip(cells, widths))


def run_facts(metrics: dict, out: Path) -> list[tuple[str, str]]:
    facts = []
    trainable, total = metrics.get("params/trainable"), metrics.get("params/total")
    if is_number(trainable) and is_number(total) and total:
        facts.append(("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"))
    if is_number(metrics.get("train/steps")):
        training = f"{metrics['train/steps']} steps"
        if is_number(metrics.get("train/tokens_per_sec")):
            training += f", {metrics['train/tokens_per_sec']:,.0f} tokens/s"
        facts.append(("training", training))
    written = [name for name in OUTPUT_FILES if (out / name.rstrip("/")).exists()]
    facts.append(("outputs", f"{shown(out)}/" + (f"  {', '.join(written)}" if written else "")))
    offline_runs = sorted((out / "wandb").glob("offline-run-*"))
    if offline_runs:  # several: a resumed run, one directory per session
        target = shown(offline_runs[0]) if len(offline_runs) == 1 else f"{shown(out / 'wandb')}/offline-run-*"
        facts.append(("W&B (offline)", f"upload: wandb sync {target}"))
    return facts


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell(value: object) -> str:
    return f"{value:.3f}" if is_number(value) else "-"


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (Hydra's outputs/...), else absolute."""
    path = Path(path).absolute()
    cwd = Path.cwd()
    return os.path.relpath(path, cwd) if path.is_relative_to(cwd) else str(path)
