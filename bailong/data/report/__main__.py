"""``python -m bailong.data.report [overrides] [--jaccard 0.5] [--span 24]``: the split report as JSON on stdout.

python -m bailong.data.report                                  # the default data (conf/data/pretrain_tc.yaml)
python -m bailong.data.report 'data.tc.0.group_by=null' data.dedup.group=null   # the same text, ungrouped
"""

from __future__ import annotations

import argparse
import json
import sys

from bailong.data.report import split_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bailong.data.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py (data=..., data.dedup...)")
    parser.add_argument("--jaccard", type=float, default=0.5, help="shingle Jaccard of a near-duplicate pair")
    parser.add_argument("--span", type=int, default=24, help="characters of a span shared with training text")
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    from bailong.config import compose_config

    cfg = compose_config(args.overrides)
    report = split_report(OmegaConf.to_object(cfg.data), cfg.paths.cache_dir, jaccard=args.jaccard, span=args.span)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
