"""Build data/parallel/libreoffice_help.jsonl.gz: Traditional Chinese – English paragraph pairs of LibreOffice's
help, none of which the training text holds (bailong/eval/parallel_set.py says how).

    apt-get download libreoffice-help-zh-tw libreoffice-help-en-us      # Debian 12: 4:7.4.7-1+deb12u14
    python experiments/build_parallel_set.py --tc libreoffice-help-zh-tw_*.deb --en libreoffice-help-en-us_*.deb

Training text: the ``train`` split of the data config's prepared text (``--data``, the default run's), the text
the mini base and every stage train on. Prints the counts at each step as JSON and writes them beside the set
(``libreoffice_help.stats.json``). The same packages give the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bailong.cache import default_cache_dir  # noqa: E402
from bailong.data.config import data_config_from_yaml  # noqa: E402
from bailong.data.prepare import prepare_text  # noqa: E402
from bailong.eval.parallel_set import SPLITS, aligned_pairs, assign_split, drop_trained, help_pages  # noqa: E402


def sample(pairs: list[dict], per_split: int) -> list[dict]:
    """Up to ``per_split`` pairs of each split, by a hash of their text (spread over the pages), in page order."""
    chosen = []
    for split in SPLITS:
        members = [p for p in pairs if p["split"] == split]
        members.sort(key=lambda p: hashlib.sha256((p["tc"] + "\n" + p["en"]).encode()).digest())
        chosen += members[:per_split]
    return sorted(chosen, key=lambda p: (p["page"], p["id"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tc", type=Path, required=True, help="libreoffice-help-zh-tw: the .deb or its files")
    parser.add_argument("--en", type=Path, required=True, help="libreoffice-help-en-us: the .deb or its files")
    parser.add_argument("--out", type=Path, default=ROOT / "data/parallel/libreoffice_help.jsonl.gz")
    parser.add_argument("--data", type=Path, default=ROOT / "conf/data/pretrain_tc.yaml")
    parser.add_argument("--per-split", type=int, default=500)
    parser.add_argument("--span", type=int, default=24)
    args = parser.parse_args(argv)

    tc_pages, en_pages = help_pages(args.tc, "zh-TW"), help_pages(args.en, "en-US")
    pairs = aligned_pairs(tc_pages, en_pages)
    prepared = prepare_text(data_config_from_yaml(args.data, ROOT / "data"), default_cache_dir())
    held_out, dropped = drop_trained(
        pairs, prepared.documents("tc", "train"), prepared.documents("en", "train"), span=args.span
    )
    for pair in held_out:
        pair["split"] = assign_split(pair["page"])
    chosen = sample(held_out, args.per_split)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({k: p[k] for k in ("tc", "en", "page", "id", "split")}, ensure_ascii=False) + "\n" for p in chosen
    )
    with gzip.GzipFile(args.out, "wb", mtime=0) as fh:  # mtime 0: the same packages give the same bytes
        fh.write(lines.encode("utf-8"))
    stats = {
        "pages": {"zh-TW": len(tc_pages), "en-US": len(en_pages), "both": len(tc_pages.keys() & en_pages.keys())},
        "translated_pairs": len(pairs),
        **dropped,
        "held_out_pairs": len(held_out),
        "held_out_by_split": {s: sum(p["split"] == s for p in held_out) for s in SPLITS},
        "written": {
            s: {
                "pairs": sum(p["split"] == s for p in chosen),
                "pages": len({p["page"] for p in chosen if p["split"] == s}),
                "tc_chars": sum(len(p["tc"]) for p in chosen if p["split"] == s),
                "en_chars": sum(len(p["en"]) for p in chosen if p["split"] == s),
            }
            for s in SPLITS
        },
        "span": args.span,
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
    }
    text = json.dumps(stats, indent=2, ensure_ascii=False)
    args.out.with_name(args.out.name.split(".")[0] + ".stats.json").write_text(text + "\n")
    print(text)
    return stats


if __name__ == "__main__":
    main()
