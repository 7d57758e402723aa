"""Read run directories as the pipeline and run.py leave them.

A run directory holds ``.hydra/{config,hydra,overrides}.yaml`` (Hydra), ``metrics.json`` (written last by a
finished run), ``csv/metrics.csv`` (Lightning's CSVLogger) and, for a failed run, ``error.json`` (run.py).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bailong.overrides import override_value
from bailong.run_files import ERROR_FILE, METRICS_FILE


class DashboardInputError(ValueError):
    """A path given to the dashboard holds no run directories, or a run file cannot be read."""


@dataclass
class Run:
    path: Path
    overrides: dict[str, Any]  # key -> value, as given on the command line or by the sweeper
    choices: dict[str, Any]  # config group -> chosen option (hydra.runtime.choices)
    config: dict  # the resolved config
    metrics: dict = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per CSV line, numbers only
    error: dict | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "ok" if self.metrics else "incomplete"  # no metrics.json, no error.json: running or killed

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    def value(self, key: str) -> Any:
        """The run's setting of ``key``: its override, else its group choice, else its resolved config."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return self.choices[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, else every run directory below it (a multirun sweep)."""
    path = Path(path)
    if not path.exists():
        raise DashboardInputError(f"{path}: no such directory")
    if (path / ".hydra" / "config.yaml").is_file():
        return [path]
    found = sorted({p.parent.parent for p in path.glob("**/.hydra/config.yaml")}, key=_natural)
    if not found:
        raise DashboardInputError(f"{path}: no run directories (expected <run>/.hydra/config.yaml below it)")
    return found


def _natural(path: Path) -> tuple:
    """Sweep job directories 0, 1, ..., 10 in job order, not string order."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def load_run(path: Path) -> Run:
    hydra_dir = path / ".hydra"
    overrides = _read_yaml(hydra_dir / "overrides.yaml") or []
    hydra_cfg = _read_yaml(hydra_dir / "hydra.yaml") or {}
    choices = (hydra_cfg.get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
    run = Run(
        path=path,
        overrides=parse_overrides(overrides, hydra_dir / "overrides.yaml"),
        choices={k: v for k, v in choices.items() if not k.startswith("hydra/")},
        config=_read_yaml(hydra_dir / "config.yaml") or {},
    )
    if (path / METRICS_FILE).is_file():
        run.metrics = _read_json(path / METRICS_FILE)
    if (path / ERROR_FILE).is_file():
        run.error = _read_json(path / ERROR_FILE)
    if (path / "csv" / "metrics.csv").is_file():
        run.curve = read_curve(path / "csv" / "metrics.csv")
    return run


def collect_runs(paths: list[Path]) -> list[Run]:
    """Every run below ``paths``, in sweep order; a directory named twice is read once."""
    seen: dict[Path, None] = {}
    for path in paths:
        for run_dir in find_run_dirs(Path(path)):
            seen.setdefault(run_dir.resolve(), None)
    return [load_run(p) for p in seen]


def parse_overrides(overrides: list, source: Path) -> dict[str, Any]:
    """``["init=random", "lora.r=8"]`` → ``{"init": "random", "lora.r": 8}`` (values typed as YAML)."""
    parsed = {}
    for line, item in enumerate(overrides, start=1):
        key, sep, text = str(item).lstrip("+~").partition("=")
        if not sep:
            raise DashboardInputError(f"{source}: item {line} {item!r} is not a key=value override")
        parsed[key] = override_value(text)
    return parsed


def read_curve(path: Path) -> list[dict[str, float]]:
    """Lightning's CSVLogger file: one row per logging call, empty cells for keys not logged then."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            values = {}
            for key, text in row.items():
                try:
                    values[key] = float(text)
                except (TypeError, ValueError):
                    continue  # empty cell
            if values:
                rows.append(values)
    return rows


def curve_points(run: Run, key: str) -> list[tuple[float, float]]:
    """(steps done, value) for ``key`` in the run's CSV log, finite values only, by step. Lightning writes a value
    logged after optimizer step k (1-based) under step k - 1: validation after 50 steps is CSV step 49."""
    points = {
        row["step"] + 1: row[key] for row in run.curve if key in row and "step" in row and math.isfinite(row[key])
    }
    return sorted(points.items())


def elapsed_at(run: Run, steps: float) -> float | None:
    """Seconds of training (validation excluded) after ``steps`` optimizer steps: ``train/elapsed_s`` as logged at the
    newest logging step at or before it (0 at step 0; None when the run logged no time by then)."""
    if steps == 0:
        return 0.0
    logged = [(s, v) for s, v in curve_points(run, "train/elapsed_s") if s <= steps]
    return logged[-1][1] if logged else None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DashboardInputError(f"{path}: not valid YAML ({err})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DashboardInputError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
