"""Runs → groups → table and figures → index.html, results.md, results.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import plots
from .collect import DashboardInputError, Run, collect_runs
from .page import render_page
from .table import Group, group_runs, to_csv, to_markdown


@dataclass
class Dashboard:
    out_dir: Path
    runs: list[Run]
    groups: list[Group]
    metric: str

    @property
    def html(self) -> Path:
        return self.out_dir / "index.html"


def build_dashboard(sources: list[Path], out_dir: Path | None = None, title: str | None = None) -> Dashboard:
    """Read every run below ``sources`` and write the page and tables to ``out_dir`` (default: the first
    source, beside its runs)."""
    sources = [Path(s) for s in sources]
    if not sources:
        raise DashboardInputError("give at least one sweep or run directory")
    runs = collect_runs(sources)
    out_dir = Path(out_dir) if out_dir is not None else sources[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = runs[0].config.get("sweep_metric", "final/tc_bpc")
    groups = group_runs(runs)
    title = title or "bailong sweep: " + ", ".join(dict.fromkeys(str(r.config.get("task_name", "?")) for r in runs))

    figures = []
    for heading, caption, fig in (
        (
            "Learning curves",
            "val/tc_bpc during training per group: the line is the mean over seeds, the band "
            "spans the seeds; step 0 is the initialised model before any update.",
            plots.learning_curves(groups),
        ),
        (
            "Learning curves against TC characters",
            "The same curves against the Traditional Chinese characters trained on (steps x characters per step of "
            "the run's TC rows): at equal steps a tokenizer with fewer tokens per character trains on more text.",
            plots.learning_curves(groups, x="tc_chars"),
        ),
        (
            "Learning curves against training time",
            "The same curves against seconds spent in training steps (validation excluded; the seeds' mean). "
            "Wall times are comparable only between runs made side by side on one quiet machine.",
            plots.learning_curves(groups, x="seconds"),
        ),
        (
            "Step 0 against final",
            "TC bits/char right after initialisation and after training (error bars: std "
            "over seeds); the dashed line is the base model with its own tokenizer.",
            plots.step0_vs_final(groups),
        ),
        (
            "Added vocabulary",
            "Each dot is a run, lines join the means. Fertility = tokens per character on the "
            "held-out text; 0 added = the base tokenizer.",
            plots.vocabulary_figure(runs),
        ),
        ("LoRA rank", "Each dot is a run, lines join the means; the x axis is log2.", plots.rank_figure(runs)),
    ):
        if fig is not None:
            figures.append((heading, caption, plots.to_base64_png(fig)))

    (out_dir / "results.md").write_text(to_markdown(groups, metric))
    (out_dir / "results.csv").write_text(to_csv(groups))
    (out_dir / "index.html").write_text(render_page(title, sources, runs, groups, metric, figures))
    return Dashboard(out_dir, runs, groups, metric)
