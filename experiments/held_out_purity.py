"""Language identification and Traditional purity of every `test` document of a data config, and of its OpenCC
`t2s` conversion: what docs/bilingual_eval.md's consistency table reports.

    .venv/bin/python experiments/held_out_purity.py [--data conf/data/pretrain_tc.yaml] [--split test]

Purity is pooled per corpus: Traditional over Traditional + Simplified characters of all its documents.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opencc  # noqa: E402

from bailong.cache import default_cache_dir  # noqa: E402
from bailong.data.config import data_config_from_yaml  # noqa: E402
from bailong.data.prepare import prepare_text  # noqa: E402
from bailong.eval.consistency import identify_language, script_counts  # noqa: E402


def pooled_purity(texts: list[str]) -> float | None:
    counts = [script_counts(t) for t in texts]
    trad, simp = sum(c.traditional for c in counts), sum(c.simplified for c in counts)
    return trad / (trad + simp) if trad + simp else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "conf/data/pretrain_tc.yaml")
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    args = parser.parse_args()
    data = data_config_from_yaml(args.data, ROOT / "data")
    prepared = prepare_text(data, default_cache_dir())
    t2s = opencc.OpenCC("t2s")
    print("| corpus | docs | identified | purity | after `t2s`: identified | purity |")
    print("|---|---|---|---|---|---|")
    for lang in ("tc", "en"):
        for spec, docs in zip(getattr(data, lang), prepared.documents_by_source(lang, args.split)):
            docs = list(docs)
            cells = [f"{lang}/{Path(spec.path).name.split('.')[0]}", str(len(docs))]
            for texts in (docs, [t2s.convert(d) for d in docs]) if lang == "tc" else (docs,):
                found = Counter(map(identify_language, texts))
                purity = pooled_purity(texts)
                shown = "—" if purity is None else f"{purity:.4f}"
                cells += [", ".join(f"{n} {k}" for k, n in found.most_common()), shown]
            print("| " + " | ".join(cells + [""] * (6 - len(cells))) + " |")


if __name__ == "__main__":
    main()
