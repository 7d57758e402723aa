"""Compare the runs of one or more sweeps on one static page.

    python -m bailong.dashboard outputs/ablation_init/multirun/<sweep> [more dirs] [--out DIR]

Writes ``index.html`` (self-contained: figures inline as base64 PNG), ``results.md`` and ``results.csv``
(the same table: runs grouped by their swept values, mean ± std over seeds). Failed runs (``error.json``)
are listed with their error.
"""

from .build import Dashboard, build_dashboard

__all__ = ["Dashboard", "build_dashboard"]
