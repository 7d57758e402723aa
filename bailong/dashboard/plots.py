"""The dashboard's figures, drawn with matplotlib's Agg backend and embedded in the page as base64 PNG.

Each function returns a ``Figure`` or None when the runs cannot show it (e.g. no rank was swept).
"""

from __future__ import annotations

import base64
import io
import math
import statistics

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .collect import Run, curve_points, elapsed_at  # noqa: E402
from .table import Group  # noqa: E402

plt.rcParams.update(
    {
        "figure.dpi": 100,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 10,
        "legend.fontsize": 9,
        "legend.frameon": False,
    }
)
COLORS = plt.get_cmap("tab10").colors


def to_base64_png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# the x axes of learning curves: steps (compute at one model size), TC characters trained on (how much Chinese
# text: the extended tokenizer packs more of it into a step), training seconds (validation excluded)
X_AXES = {
    "step": "training step",
    "tc_chars": "TC characters trained on",
    "seconds": "training time (s, validation excluded)",
}


def x_value(run: Run, steps: float, x: str) -> float | None:
    """Where a point ``steps`` optimizer steps into ``run`` lies on the axis ``x`` (None: the run cannot say)."""
    if x == "step":
        return steps
    if x == "tc_chars":
        per_step = run.metrics.get("train/tc_chars_per_step")
        return steps * per_step if isinstance(per_step, (int, float)) else None
    if x == "seconds":
        return elapsed_at(run, steps)
    raise ValueError(f"x={x!r}: expected one of {', '.join(X_AXES)}")


def learning_curves(groups: list[Group], key: str = "val/tc_bpc", x: str = "step") -> Figure | None:
    """``key`` against ``x`` (``X_AXES``) per group: at each step the mean over seeds of x and of the value, band =
    the seeds' min..max value; step 0 from metrics.json."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for i, group in enumerate(groups):
        by_step: dict[float, list[tuple[float, float]]] = {}
        for run in (r for r in group.runs if r.status == "ok"):
            start = run.metrics.get(key.replace("val/", "step0/"))
            points = ([(0.0, start)] if isinstance(start, (int, float)) else []) + curve_points(run, key)
            for step, value in points:
                where = x_value(run, step, x)
                if where is not None:
                    by_step.setdefault(step, []).append((where, value))
        if len(by_step) < 2:
            continue
        steps = sorted(by_step)
        xs = [statistics.fmean(p[0] for p in by_step[s]) for s in steps]
        means = [statistics.fmean(p[1] for p in by_step[s]) for s in steps]
        color = COLORS[i % len(COLORS)]
        ax.plot(xs, means, marker="o", markersize=3.5, color=color, label=group.label)
        if any(len(by_step[s]) > 1 for s in steps):
            ax.fill_between(
                xs,
                [min(p[1] for p in by_step[s]) for s in steps],
                [max(p[1] for p in by_step[s]) for s in steps],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        drawn += 1
    base = _mean_metric(groups, key.replace("val/", "base/"))
    if base is not None:
        ax.axhline(base, color="0.3", linestyle="--", linewidth=1, label=f"base model ({base:.3f})")
    if not drawn:
        plt.close(fig)
        return None
    if x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel=X_AXES[x],
        ylabel=f"{key} (bits/char, lower is better)",
        title=f"Learning curves: {key} (0 = initialised, before any update)",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a curve
    return fig


def step0_vs_final(groups: list[Group], language: str = "tc") -> Figure | None:
    """Bits/char right after init and after training, per group, with the base model as a line."""
    scored = [g for g in groups if f"final/{language}_bpc" in g.stats]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(scored) + 2), 4.5))
    width = 0.38
    for offset, (stage, color) in zip((-width / 2, width / 2), (("step0", COLORS[1]), ("final", COLORS[0]))):
        key = f"{stage}/{language}_bpc"
        stats = [g.stats.get(key) for g in scored]
        xs = [i + offset for i in range(len(scored))]
        means = [s.mean if s else math.nan for s in stats]
        errs = [s.std if s and s.std is not None else 0.0 for s in stats]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, color=color, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    base = _mean_metric(scored, f"base/{language}_bpc")
    if base is not None:
        ax.axhline(base, color="0.3", linestyle="--", linewidth=1, label=f"base model ({base:.3f})")
    values = [
        g.stats[k].mean for g in scored for k in (f"step0/{language}_bpc", f"final/{language}_bpc") if k in g.stats
    ] + ([base] if base is not None else [])
    ax.set_ylim(min(values) * 0.9, max(values) * 1.06)  # the differences, not the distance from zero
    ax.set_xticks(
        range(len(scored)),
        [g.label for g in scored],
        rotation=20 if len(scored) > 4 else 0,
        ha="right" if len(scored) > 4 else "center",
    )
    ax.set(
        ylabel=f"{language.upper()} bits/char (lower is better)",
        title=f"{language.upper()} bits/char at step 0 and after training",
    )
    ax.legend(loc="upper left", ncols=3)
    return fig


def against_setting(
    runs: list[Run], setting: str, panels: list[tuple[str, list[str]]], xlabel: str, title: str, log_x: bool = False
) -> Figure | None:
    """One panel per (ylabel, metric keys): each metric against a numeric config ``setting`` across runs
    (dots = runs, line = mean); None unless the setting takes 2+ values among finished runs."""
    done = [r for r in runs if r.status == "ok" and isinstance(r.value(setting), (int, float))]
    xs = sorted({float(r.value(setting)) for r in done})
    if len(xs) < 2:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels):
        for j, key in enumerate(keys):
            color = COLORS[j % len(COLORS)]
            points = [
                (float(r.value(setting)), r.metrics[key])
                for r in done
                if isinstance(r.metrics.get(key), (int, float)) and math.isfinite(r.metrics[key])
            ]
            if not points:
                continue
            ax.scatter(*zip(*points), s=14, color=color, alpha=0.6)
            means = [
                (x, statistics.fmean(v for px, v in points if px == x)) for x in xs if any(px == x for px, _ in points)
            ]
            ax.plot(*zip(*means), marker="o", color=color, label=key)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def vocabulary_figure(runs: list[Run]) -> Figure | None:
    return against_setting(
        runs,
        "tokenizer.added_vocab",
        [
            ("tokens per character (fertility)", ["tokenizer/tc_tokens_per_char", "tokenizer/en_tokens_per_char"]),
            ("bits/char (lower is better)", ["step0/tc_bpc", "final/tc_bpc"]),
            ("English bits/char", ["step0/en_bpc", "final/en_bpc"]),
        ],
        xlabel="added vocabulary (new TC tokens)",
        title="Fertility and bits/char against added vocabulary size",
    )


def rank_figure(runs: list[Run]) -> Figure | None:
    return against_setting(
        runs,
        "lora.r",
        [
            ("trainable parameters", ["params/trainable"]),
            ("bits/char (lower is better)", ["final/tc_bpc"]),
            ("tokens/s", ["train/tokens_per_sec"]),
        ],
        xlabel="LoRA rank r",
        title="Trainable parameters, bits/char and speed against LoRA rank",
        log_x=True,
    )


def _mean_metric(groups: list[Group], key: str) -> float | None:
    values = [g.stats[key].mean for g in groups if key in g.stats]
    return statistics.fmean(values) if values else None
