"""The self-contained HTML page: summary, results table, figures (inline base64 PNG), failed runs."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from pathlib import Path

from .collect import Run
from .table import Group, best_group, format_stat, present_columns, runs_cell

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.7rem;margin:0 0 4px} h2{font-size:1.2rem;margin:32px 0 10px;border-bottom:2px solid #dde1e8;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 18px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 16px;min-width:130px}
.card b{display:block;font-size:1.4rem} .card span{color:#5b6475;font-size:.85rem}
.card.bad b{color:#b42318}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e8;font-size:.85rem;width:100%}
th,td{padding:6px 8px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}
th{background:#eef1f6;vertical-align:bottom;white-space:normal;min-width:60px}
.scroll{overflow-x:auto} th small{display:block;color:#6b7385;font-weight:400;font-family:monospace;word-break:break-all}
td.key,th.key{text-align:left;font-family:monospace} tr.best td{background:#eaf6ec} tr.best td.metric{font-weight:700}
tr.allfailed td{color:#98a0b0}
figure{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:0 0 18px;padding:12px}
figure img{max-width:100%;display:block;margin:0 auto} figcaption{color:#5b6475;font-size:.88rem;margin-top:6px}
.failed{background:#fff;border:1px solid #f1c0bb;border-left:4px solid #b42318;border-radius:6px;padding:10px 14px;margin-bottom:10px}
.failed code{font-size:.85rem} pre{white-space:pre-wrap;font-size:.8rem;background:#f6f7f9;padding:8px;max-height:320px;overflow:auto}
.note{color:#5b6475;font-size:.88rem}
"""  # noqa: E501  CSS rules, one line per selector group


def render_page(
    title: str,
    sources: list[Path],
    runs: list[Run],
    groups: list[Group],
    metric: str,
    figures: list[tuple[str, str, str]],
) -> str:
    """``figures``: (heading, caption, base64 PNG)."""
    failed = [r for r in runs if r.status == "failed"]
    incomplete = [r for r in runs if r.status == "incomplete"]
    best = best_group(groups, metric)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{len(runs)} runs from {", ".join(f"<code>{escape(str(s))}</code>" for s in sources)} · '
        f"written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · bits per character: lower is better, "
        "comparable across tokenizers</p>",
        _cards(runs, groups, failed, incomplete, best, metric),
        "<h2>Results</h2>",
        _table(groups, metric, best),
        '<p class="note">mean ± sample standard deviation over the seeds of each group (runs = finished runs); '
        f"green: lowest <code>{escape(metric)}</code>. <i>base</i>: the base model with its own tokenizer; "
        "<i>step 0</i>: the extended, initialised model before any update.</p>",
    ]
    for heading, caption, png in figures:
        parts += [
            f"<h2>{escape(heading)}</h2>",
            f'<figure><img alt="{escape(heading)}" src="data:image/png;base64,{png}">',
            f"<figcaption>{escape(caption)}</figcaption></figure>",
        ]
    parts += _failures(failed, incomplete)
    parts += ["<h2>Runs</h2>", _run_list(runs), "</main></body></html>"]
    return "\n".join(parts)


def _cards(runs, groups, failed, incomplete, best, metric) -> str:
    cards = [(len(runs), "runs", ""), (len(groups), "groups", ""), (len(failed), "failed", "bad" if failed else "")]
    if incomplete:
        cards.append((len(incomplete), "incomplete", "bad"))
    if best is not None:
        cards.append((f"{best.stats[metric].mean:.3f}", f"best {metric}: {best.label}", ""))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card {cls}"><b>{escape(str(v))}</b><span>{escape(label)}</span></div>'
            for v, label, cls in cards
        )
        + "</div>"
    )


def _table(groups: list[Group], metric: str, best: Group | None) -> str:
    keys = list(groups[0].values) if groups else []
    columns = present_columns(groups)
    head = (
        "".join(f'<th class="key">{escape(k)}</th>' for k in keys)
        + "<th>runs</th>"
        + "".join(f"<th>{escape(heading)}<small>{escape(key)}</small></th>" for key, heading, _ in columns)
    )
    rows = []
    for group in groups:
        cls = "best" if group is best else ("allfailed" if not group.count("ok") else "")
        cells = "".join(f'<td class="key">{escape(str(v))}</td>' for v in group.values.values())
        cells += f"<td>{escape(runs_cell(group))}</td>"
        cells += "".join(
            f'<td class="{"metric" if key == metric else ""}">{escape(format_stat(group.stats.get(key), d))}</td>'
            for key, _, d in columns
        )
        rows.append(f'<tr class="{cls}">{cells}</tr>')
    return (
        f'<div class="scroll"><table id="results"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _failures(failed: list[Run], incomplete: list[Run]) -> list[str]:
    if not failed and not incomplete:
        return []
    parts = ["<h2>Failed runs</h2>"]
    for run in failed:
        err = run.error or {}
        overrides = " ".join(f"{k}={v}" for k, v in run.overrides.items())
        parts.append(
            f'<div class="failed"><b>{escape(run.name)}</b> · <code>{escape(overrides)}</code><br>'
            f"<b>{escape(str(err.get('type', '?')))}</b>: {escape(str(err.get('message', '')))}"
            f"<details><summary>traceback</summary><pre>{escape(str(err.get('traceback', '')))}</pre>"
            "</details></div>"
        )
    for run in incomplete:
        parts.append(
            f'<div class="failed"><b>{escape(run.name)}</b>: no metrics.json and no error.json '
            "(still running, or killed before it could record an error)</div>"
        )
    return parts


def _run_list(runs: list[Run]) -> str:
    rows = "".join(
        f'<tr><td class="key">{escape(r.name)}</td><td class="key">{escape(r.status)}</td>'
        f'<td class="key">{escape(" ".join(f"{k}={v}" for k, v in r.overrides.items()))}</td>'
        f"<td>{escape(format_metric(r))}</td></tr>"
        for r in runs
    )
    return (
        '<table><thead><tr><th class="key">run</th><th class="key">status</th><th class="key">overrides</th>'
        f"<th>sweep metric</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def format_metric(run: Run) -> str:
    key = run.config.get("sweep_metric", "final/tc_bpc")
    value = run.metrics.get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"
