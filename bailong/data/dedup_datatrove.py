"""Near-duplicate removal on disk and across machines: datatrove's MinHash stages over the prepare stage's shards.

The in-memory engine (``bailong.data.dedup``: datasketch's LSH in the prepare process) costs about 2.4 KB per
kept document, so it stops at a few million documents per machine. With ``data.dedup.engine=datatrove`` the
text step writes every converted document to candidate shards, and datatrove (Hugging Face's data-processing
library, the engine behind FineWeb's dedup) runs its MinHash stages over them, in parallel tasks on this
machine or as SLURM job arrays (``data.prepare.executor``):

1. **signatures**, one task per candidate shard: each document's MinHash, cut into LSH bands, each band's
   signatures sorted on disk;
2. **buckets**, ``tasks_per_bucket`` tasks per band: a merge of the band's sorted files; two documents sharing
   a band are a duplicate pair;
3. **clusters**, one task: union-find over the pairs (memory: the duplicated documents only); one document of
   each cluster survives;
4. **filter**, here, one shard at a time (``kept_documents``): the survivors are written to the final shard.

The two engines share the shingles and the threshold curve: the shingles are character n-grams
(``data.dedup.ngram``) of ``bailong.data.dedup.normalise``'s text, passed to datatrove as its word tokenizer
(its own tokenizers split Chinese into words with spaCy + jieba), with datatrove's own text simplification off;
the band count and width are the ones datasketch's ``MinHashLSH`` picks for ``(near, num_perm)``. They differ
in which copy survives: the memory engine keeps the first in corpus order, datatrove the root of each cluster's
union-find (deterministic for the same input). A document shorter than one shingle has no signature and is
never removed. Exact copies share every band, so they are removed here too, counted as near-duplicates.
Each stage's finished tasks are recorded under ``<work>/logs``: rerun after a kill, only unfinished tasks run.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from bailong.data.config import DedupConfig, PrepareConfig
from bailong.data.corpus import CorpusError, read_jsonl
from bailong.data.dedup import normalise

log = logging.getLogger(__name__)

MINHASH_SEED = 1  # the memory engine's Deduplicator seed: the same seed names the same run in both

# bailong.data.dedup.normalise does the simplification (in CharacterShingles), so datatrove's is off
_NO_SIMPLIFICATION = TextNormConfig(
    lowercase=False, norm_whitespace=False, remove_punctuation=False, norm_unicode_diacritics=False, norm_numbers=False
)


class CharacterShingles(WordTokenizer):
    """datatrove's MinHash shingles are n consecutive "words": here the characters of the normalised text, as in
    the memory engine (Chinese has no spaces between words)."""

    def __init__(self) -> None:
        super().__init__(language=None)

    def word_tokenize(self, text: str) -> list[str]:
        return list(normalise(text))

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class ShardFiles(PipelineStep):
    """The reader: task ``rank`` reads the ``rank``-th shard, so a document's index in its task (what the
    signatures and the removal lists record) is its line in that file."""

    type = "📖 - READER"
    name = "📒 bailong text shards"

    def __init__(self, files: list[str]):
        super().__init__()
        self.files = files

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for n, (_, record) in enumerate(read_jsonl(self.files[rank])):
            self.stat_update("documents")
            yield Document(text=record["text"], id=f"{rank}/{n}")


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    """datatrove's MinHash settings for ``data.dedup``: the bands datasketch's LSH picks for (near, num_perm)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near, num_perm=cfg.num_perm)  # an empty index: only its (b, r) choice is read
    return MinhashConfig(
        n_grams=cfg.ngram,
        num_buckets=lsh.b,
        hashes_per_bucket=lsh.r,
        seed=MINHASH_SEED,
        norm_config=_NO_SIMPLIFICATION,
        # SHA-1, as datasketch hashes shingles: datatrove 0.10's default xxhash passes str, which xxhash 4 refuses
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


def _executor(pipeline: list, tasks: int, stage: str, work: Path, prepare: PrepareConfig, workers: int, depends):
    logs = str(work / "logs" / stage)
    if prepare.executor == "local":
        return LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=max(1, min(workers, tasks)),
            logging_dir=logs,
            depends=depends,
            start_method="fork",  # the prepare pool forks too: no re-import of torch per task
        )
    slurm = prepare.slurm
    return SlurmPipelineExecutor(
        pipeline,
        tasks=tasks,
        time=slurm.time,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        qos=slurm.qos,
        venv_path=slurm.venv_path,
        job_name=f"{slurm.job_name}-{stage}",
        sbatch_args=dict(slurm.sbatch_args),
        logging_dir=logs,
        depends=depends,
    )


def run_minhash_stages(files: list[str], work: Path, dedup: DedupConfig, prepare: PrepareConfig, workers: int) -> Path:
    """Stages 1–3 over ``files`` (the candidate shards, on a file system every task can read), their files under
    ``work``; returns the folder of removal lists ``kept_documents`` reads. Finished tasks are skipped."""
    config = minhash_config(dedup)
    signatures, buckets, removals = work / "signatures", work / "buckets", work / "removals"
    stages = [
        (
            "signatures",
            [ShardFiles(files), MinhashDedupSignature(str(signatures), config=config, language=CharacterShingles())],
            len(files),
        ),
        (
            "buckets",
            [MinhashDedupBuckets(str(signatures), str(buckets), config=config)],
            config.num_buckets * prepare.tasks_per_bucket,
        ),
        ("clusters", [MinhashDedupCluster(str(buckets), str(removals), config=config)], 1),
    ]
    executors: list = []
    for stage, pipeline, tasks in stages:
        depends = executors[-1] if executors else None
        executors.append(_executor(pipeline, tasks, stage, work, prepare, workers, depends))
    log.info(
        "datatrove MinHash over %d shards: %d bands of %d hashes, %s executor",
        len(files),
        config.num_buckets,
        config.hashes_per_bucket,
        prepare.executor,
    )
    executors[-1].run()  # runs (or, under SLURM, submits) its dependencies first
    if prepare.executor == "slurm":
        for (stage, _, _), executor in zip(stages, executors):
            _wait_for_slurm(stage, executor, prepare.slurm.poll_seconds, work)
    return removals


def _wait_for_slurm(stage: str, executor: SlurmPipelineExecutor, poll_seconds: int, work: Path) -> None:
    """Until every task of the stage has recorded its completion; an error once its job has left the queue with
    tasks unfinished (a failed or cancelled array: rerunning the prepare resubmits only those)."""
    while unfinished := executor.get_incomplete_ranks():
        job = executor.job_id
        if job not in (None, -1) and not _in_queue(str(job)) and executor.get_incomplete_ranks():
            raise CorpusError(
                f"datatrove's {stage} stage (SLURM job {job}) left the queue with {len(unfinished)} of "
                f"{executor.world_size} tasks unfinished: see {work / 'logs' / stage}; "
                "rerun the prepare to resubmit them"
            )
        log.info("waiting for datatrove's %s stage: %d tasks unfinished", stage, len(unfinished))
        time.sleep(poll_seconds)


def _in_queue(job_id: str) -> bool:
    listed = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=False)
    return bool(listed.stdout.strip())


def kept_documents(texts: list[str], rank: int, removals: Path) -> list[str]:
    """Stage 4 on one candidate shard (the ``rank``-th): its documents that survive, in order."""
    docs = (Document(text=text, id=f"{rank}/{n}") for n, text in enumerate(texts))
    return [doc.text for doc in MinhashDedupFilter(str(removals)).run(docs, rank=rank)]
