"""python -m bailong.dashboard <sweep or run dir> [more dirs] [--out DIR] [--title TEXT]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import build_dashboard
from .collect import DashboardInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bailong.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="multirun sweep directories or run directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write index.html, results.md, results.csv (default: the first source)",
    )
    parser.add_argument("--title", default=None, help="page title")
    args = parser.parse_args(argv)
    try:
        dash = build_dashboard(args.sources, args.out, args.title)
    except DashboardInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = sum(r.status == "failed" for r in dash.runs)
    print(f"{len(dash.runs)} runs ({failed} failed) in {len(dash.groups)} groups -> {dash.html}")
    print((dash.out_dir / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
