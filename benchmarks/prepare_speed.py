"""Prepare-stage throughput and memory (``bailong/data/prepare.py``), and a kill/rerun check, as JSON on stdout.

    OMP_NUM_THREADS=1 python benchmarks/prepare_speed.py [--scales 1 10] [--workers 1 2] [--dedup near datatrove off]

- corpora: the data pack's TC and EN files, and the same pack repeated ``scale`` times with a per-copy change that
  dedup cannot undo (copy ``c`` shifts every Han character's code point by ``c`` within the CJK block and every
  Latin letter by ``c`` places: same lengths and statistics, no shared shingles), so a 10x corpus is 10x the work;
- each (dedup, scale, workers) point prepares text (convert, dedup: exact + MinHash at 0.8 in memory (near) or on
  disk through datatrove as the hub configs, or off as the data pack; split) and token shards (the mini base's
  tokenizer, rows of 256) in a fresh process with an empty cache, and reports characters per second per step
  and the peak RSS of the parent and of its worker processes (``ru_maxrss``): memory flat in the corpus size
  means the stage holds no corpus; with the in-memory MinHash the LSH index grows with the documents kept;
- kill/rerun: the largest corpus is prepared in a process killed (SIGKILL) once its text state file shows a few
  shards written, then prepared again; the manifest's file hashes are compared with an uninterrupted prepare's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, reset_peak_rss, run_worker, window_peak_rss_mib  # noqa: E402

SCRIPT = Path(__file__).resolve()
PACK = {
    "tc": ["zh_tw/poetry_tang.jsonl.gz", "zh_tw/modern.jsonl.gz", "zh_tw/classics.jsonl.gz"],
    "en": ["en/kjv.jsonl.gz", "en/fortunes.jsonl.gz"],
}


def shifted(text: str, copy: int) -> str:
    """Copy ``copy`` of a document: Han characters and Latin letters moved by ``copy`` places (0: unchanged)."""
    if copy == 0:
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if 0x4E00 <= o <= 0x9FFF:
            o = 0x4E00 + (o - 0x4E00 + 97 * copy) % (0x9FFF - 0x4E00 + 1)
        elif 0x61 <= o <= 0x7A:
            o = 0x61 + (o - 0x61 + copy) % 26
        elif 0x41 <= o <= 0x5A:
            o = 0x41 + (o - 0x41 + copy) % 26
        out.append(chr(o))
    return "".join(out)


def write_corpus(directory: Path, scale: int) -> dict[str, Path]:
    """One JSON Lines file per language: the pack's documents, ``scale`` shifted copies of each."""
    from bailong.data.config import CorpusConfig
    from bailong.data.corpus import iter_documents

    files = {}
    for lang, names in PACK.items():
        path = directory / f"{lang}_x{scale}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
            for copy in range(scale):
                for name in names:
                    for doc in iter_documents(CorpusConfig(path=str(ROOT / "data" / name))):
                        fh.write(json.dumps({"text": shifted(doc, copy)}, ensure_ascii=False) + "\n")
        files[lang] = path
    return files


DEDUP = {
    "near": {"exact": True, "near": 0.8},  # the in-memory index (datasketch)
    "datatrove": {"exact": True, "near": 0.8, "engine": "datatrove"},  # on disk: what the hub configs run
    "exact": {"exact": True, "near": None},
    "off": {"exact": False, "near": None},  # the data pack's default
}


def data_config(files: dict[str, str], workers: int, dedup: str):
    from bailong.data.config import CorpusConfig, DataConfig, DedupConfig, PrepareConfig

    return DataConfig(
        tc=[CorpusConfig(path=files["tc"])],
        en=[CorpusConfig(path=files["en"])],
        dedup=DedupConfig(**DEDUP[dedup]),
        prepare=PrepareConfig(workers=workers),
    )


def worker(files: dict[str, str], workers: int, cache: str, tokens: bool, dedup: str) -> dict:
    """One prepare in this process: both steps timed, peak RSS of this process and of its pool."""
    from bailong.data.prepare import prepare_text, prepare_tokens, prepared_counts
    from bailong.tokenization.extend import load_tokenizer

    data = data_config(files, workers, dedup)
    before = window_peak_rss_mib()  # the libraries, before any text
    reset_peak_rss()
    t0 = time.perf_counter()
    text = prepare_text(data, cache)
    text_s = time.perf_counter() - t0
    text_peak = window_peak_rss_mib()
    counts = prepared_counts(text)
    chars = sum(sum(c["chars"].values()) for c in counts.values())
    train_chars = sum(c["chars"]["train"] for c in counts.values())
    result = {
        "chars": chars,
        "docs": sum(sum(c["docs"].values()) for c in counts.values()),
        "dedup_removed": sum(c["dedup_removed"] for c in counts.values()),
        "imports_rss_mib": before,
        "text_peak_rss_mib": text_peak,
        "text_seconds": round(text_s, 2),
        "text_chars_per_sec": round(chars / text_s),
        "text_sha256": text.manifest["sha256"],
    }
    if tokens:
        tok = load_tokenizer(ROOT / "models" / "mini-base")
        texts = {lang: (lambda lang=lang: text.documents(lang, "train")) for lang in ("tc", "en")}
        reset_peak_rss()
        t0 = time.perf_counter()
        shards = prepare_tokens(texts, tok, seq_len=256, cache_dir=cache, text_key=text.root.name, workers=workers)
        tokens_s = time.perf_counter() - t0
        result.update(
            tokens_seconds=round(tokens_s, 2),
            tokens_train_chars_per_sec=round(train_chars / tokens_s),
            rows=sum(v["rows"] for v in shards.manifest["languages"].values()),
            tokens_peak_rss_mib=window_peak_rss_mib(),
        )
    result["process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["workers_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return result


def kill_and_rerun(files: dict[str, str], cache: Path, reference: dict, dedup: str) -> dict:
    """Prepare text in a process SIGKILLed after a few shards, then again: the same files as ``reference``."""
    args = [sys.executable, str(SCRIPT), "--worker", json.dumps(files), "1", str(cache), "0", dedup]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, killed_at = time.perf_counter(), None
    while proc.poll() is None and time.perf_counter() - started < 900:
        states = list(cache.glob("prepared_text/*/tc/state.pkl"))
        shards = list(cache.glob("prepared_text/*/tc/**/train-*.jsonl.gz"))  # final or datatrove's candidates
        if states and len(shards) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed_at = len(shards)
            break
        time.sleep(0.05)
    proc.wait()
    if killed_at is None:
        return {"error": "the prepare ended before three shards were written: nothing was killed"}
    rerun = run_worker(SCRIPT, args[2:], timeout=1800)
    return {
        "killed_after_train_shards": killed_at,
        "rerun_seconds": rerun["text_seconds"],
        "same_files_as_uninterrupted": rerun["text_sha256"] == reference,
        "files": len(reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dedup", nargs="+", choices=sorted(DEDUP), default=["datatrove", "near", "off"])
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        files, workers, cache, tokens, dedup = args.worker
        print(json.dumps(worker(json.loads(files), int(workers), cache, tokens == "1", dedup)))
        return

    result = {"benchmark": "prepare_speed", "machine": machine(), "points": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpora = {scale: write_corpus(tmp, scale) for scale in args.scales}
        for dedup in args.dedup:
            for scale in args.scales:
                for workers in args.workers:
                    files = {k: str(v) for k, v in corpora[scale].items()}
                    cache = tmp / f"cache_{dedup}_x{scale}_w{workers}"
                    point = run_worker(
                        SCRIPT, ["--worker", json.dumps(files), str(workers), str(cache), "1", dedup], 3600
                    )
                    point.update(
                        dedup=dedup, scale=scale, workers=workers, load_average_1m=round(os.getloadavg()[0], 2)
                    )
                    result["points"].append(point)
        largest, dedup = max(args.scales), args.dedup[0]
        files = {k: str(v) for k, v in corpora[largest].items()}
        reference = next(p for p in result["points"] if p["scale"] == largest and p["dedup"] == dedup)["text_sha256"]
        killed = kill_and_rerun(files, tmp / "cache_killed", reference, dedup)
        result["kill_and_rerun"] = {"scale": largest, "dedup": dedup, **killed}
    for point in result["points"]:
        point.pop("text_sha256")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
