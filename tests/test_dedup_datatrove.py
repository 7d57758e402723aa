"""The on-disk dedup engine (data.dedup.engine=datatrove) on real files: it removes what the in-memory engine removes
(up to which copy survives), gives the same bytes for any number of workers and after a kill in any of its stages,
and runs its stages as SLURM job arrays (a stand-in sbatch runs each array task here)."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupSignature

import bailong.data.dedup_datatrove as dedup_datatrove
from bailong.data.config import DedupConfig, PrepareConfig, SlurmConfig
from bailong.data.dedup import _shingles, normalise
from bailong.data.prepare import MANIFEST, STATE, prepare_text
from test_prepare import corpus_files, data_config, shard_hashes  # noqa: F401 (corpus_files: a fixture)

ON_DISK = DedupConfig(exact=True, near=0.8, engine="datatrove")


def on_disk(files, **prepare):
    return replace(data_config(files, **prepare), dedup=ON_DISK)


@pytest.fixture(scope="module")
def prepared_on_disk(corpus_files, tmp_path_factory):  # noqa: F811
    return prepare_text(on_disk(corpus_files), tmp_path_factory.mktemp("cache"))


def kept(prepared, lang: str) -> dict[str, str]:
    return {doc: split for split in ("train", "dev", "test") for doc in prepared.documents(lang, split)}


def jaccard(a: str, b: str) -> float:
    x, y = _shingles(normalise(a), 5), _shingles(normalise(b), 5)
    return len(x & y) / len(x | y)


def test_the_engines_remove_the_same_copies(prepared_on_disk, corpus_files, tmp_path):  # noqa: F811
    in_memory = prepare_text(data_config(corpus_files), tmp_path)
    for lang in ("tc", "en"):
        (src,) = prepared_on_disk.manifest["languages"][lang]["sources"]
        disk, memory = kept(prepared_on_disk, lang), kept(in_memory, lang)
        # the counts add up, and the files hold what the manifest counts
        assert src["dedup_exact"] == 0 and src["read"] - src["kept"] == src["dedup_near"] > 0
        assert src["kept"] == len(disk) == sum(src["docs"].values())
        assert all(src["docs"][s] == list(disk.values()).count(s) for s in ("train", "dev", "test"))
        assert len({normalise(d) for d in disk}) == len(disk)  # no exact copy survives (the EN upper-case copies)
        # a document one engine keeps and the other drops: the other kept a copy of it (Jaccard >= 0.8), but for LSH's
        # soft threshold, at most 1% of the documents
        unmatched = [
            doc
            for mine, other in ((disk, memory), (memory, disk))
            for doc in set(mine) - set(other)
            if not any(jaccard(doc, o) >= 0.8 for o in set(other) - set(mine))
        ]
        assert len(unmatched) <= 0.01 * len(memory), unmatched
    # the run's intermediate files are gone; the manifest names the final shards only
    assert not list(prepared_on_disk.root.glob("*/candidates")) and not list(prepared_on_disk.root.glob("*/minhash"))
    assert set(shard_hashes(prepared_on_disk.root)) == {
        str(p.relative_to(prepared_on_disk.root)) for p in prepared_on_disk.root.glob("*/*/*.jsonl.gz")
    }


def test_the_bands_are_the_memory_engines(prepared_on_disk):
    from datasketch import MinHashLSH

    config = dedup_datatrove.minhash_config(ON_DISK)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    assert (config.num_buckets, config.hashes_per_bucket) == (lsh.b, lsh.r)
    assert config.num_buckets * config.hashes_per_bucket <= 128


def test_workers_and_kills_in_every_stage_give_the_same_bytes(
    corpus_files,  # noqa: F811
    prepared_on_disk,
    tmp_path,
    monkeypatch,
):
    reference = shard_hashes(prepared_on_disk.root)
    assert shard_hashes(prepare_text(on_disk(corpus_files, workers=2), tmp_path / "two").root) == reference

    signatures = []  # tasks of the signature stage that ran, across the killed prepare and its rerun
    sign = MinhashDedupSignature.run

    def counted(self, data, rank=0, world_size=1):
        signatures.append(rank)
        return sign(self, data, rank, world_size)

    monkeypatch.setattr(MinhashDedupSignature, "run", counted)

    def interrupt_after(n: int, real):
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt  # a kill: nothing after this runs
            return real(*args, **kwargs)

        return interrupted

    cache = tmp_path / "killed"
    for module, name in ((MinhashDedupBuckets, "run"), (dedup_datatrove, "kept_documents")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, interrupt_after(3, real))
        with pytest.raises(KeyboardInterrupt):
            prepare_text(on_disk(corpus_files), cache)
        monkeypatch.setattr(module, name, real)
    (root,) = (cache / "prepared_text").glob("[!.]*")
    assert not (root / MANIFEST).exists() and (root / "tc" / STATE).is_file()
    assert shard_hashes(prepare_text(on_disk(corpus_files), cache).root) == reference
    # each candidate shard (one per final shard) was signed once: the second kill and the rerun skipped the tasks
    # datatrove had recorded as finished
    files = prepared_on_disk.manifest["files"]
    assert len(signatures) == sum(len(names) for lang in files.values() for names in lang.values())


FAKE_SBATCH = """#!{python}
# a stand-in for SLURM's sbatch: runs the script's array tasks here, in order, then prints a job id
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
array = re.search(r"#SBATCH --array=(\\d+)-(\\d+)", text)
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbatch.log")
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:-1]) + " " + (re.search(r"#SBATCH --job-name=(\\S+)", text).group(1)) + "\\n")
tasks = range(int(array.group(1)), int(array.group(2)) + 1) if array else [0]
for task in tasks:
    env = {{**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "7"}}
    export = [a for a in sys.argv if a.startswith("--export=")]
    if export:
        env.update(kv.split("=", 1) for kv in export[0][len("--export="):].split(",")[1:])
    subprocess.run(["bash", script], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("Submitted batch job 7")
"""
FAKE_SRUN = """#!/bin/bash
# a stand-in for srun: drop its options, run the command
while [[ "$1" == -* ]]; do [[ "$1" == "-n" ]] && shift; shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "${@: -1}"
"""
FAKE_SQUEUE = """#!/bin/bash
# the stand-in sbatch finished every job before returning: none is queued
"""


@pytest.mark.slow
def test_the_stages_run_as_slurm_job_arrays(corpus_files, prepared_on_disk, tmp_path, monkeypatch):  # noqa: F811
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {
        "sbatch": FAKE_SBATCH.format(python=sys.executable),
        "srun": FAKE_SRUN,
        "scontrol": FAKE_SCONTROL,
        "squeue": FAKE_SQUEUE,
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    # the array tasks run datatrove's launch_pickled_pipeline and merge_stats: the venv's scripts
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    prepare = PrepareConfig(
        shard_docs=100, batch_docs=32, executor="slurm", slurm=SlurmConfig(partition="cpu", poll_seconds=1)
    )
    data = replace(on_disk(corpus_files), prepare=prepare)
    assert shard_hashes(prepare_text(data, tmp_path / "cache").root) == shard_hashes(prepared_on_disk.root)
    submitted = (bin_dir / "sbatch.log").read_text().splitlines()
    stages = [line.split()[-1] for line in submitted]
    # per language: the three stages, each an array and then its stats merge, each stage after the one before
    assert stages == 2 * [f"bailong-dedup-{s}" for s in ("signatures", "buckets", "clusters") for _ in range(2)]
    assert all("--dependency=afterok:7" in submitted[i] for i in (2, 4, 8, 10))
