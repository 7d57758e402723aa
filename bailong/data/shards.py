"""Stream prepared token shards (``bailong.data.prepare``) to every rank: a fixed global order, each rank its share.

The rows of all shards form one infinite *stream* of global samples ``g = 0, 1, 2, ...``:

* **mix per step**: sample ``g`` is TC when ``floor((g + 1) p / q) > floor(g p / q)`` with ``p / q = tc_ratio``
  (a rational), so any ``n`` consecutive samples hold ``n * tc_ratio`` TC rows up to one: every batch of every
  step has the configured mix, not just the run as a whole;
* **order**: the ``k``-th TC sample is row ``perm_j[k mod n_tc]`` of the TC rows, ``j = k // n_tc`` the pass
  over them and ``perm_j`` a permutation drawn from ``(seed, "tc", j)``; EN likewise. The side short of its
  share repeats in fresh permutations, none is dropped;
* **ranks**: global batch ``b`` is samples ``[b*B*W, (b+1)*B*W)`` (``B`` per rank, ``W`` ranks); rank ``r``
  reads ``B`` consecutive ones of them. The ranks' shares are disjoint and together cover the stream;
* **resume**: the state is one integer, the global samples consumed. A resumed run starts at that sample and
  sees exactly the batches an uninterrupted run would; with another number of ranks it continues the same
  sample sequence (cut into batches of the new ``B*W``).

Rows are read from memory-mapped ``.npy`` files: a rank touches only the pages of the rows it reads.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from bailong.data.prepare import PreparedTokens


class TokenRows:
    """The rows of one language's shards, memory-mapped, as one indexable sequence (opened lazily in each process:
    a DataLoader worker maps the files itself rather than inheriting the parent's maps)."""

    def __init__(self, prepared: PreparedTokens, lang: str):
        self.files = prepared.files(lang)
        self._maps: list[np.ndarray] | None = None
        self.offsets = np.cumsum([0, *prepared.manifest["languages"][lang]["shard_rows"]]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.load(f, mmap_mode="r") for f in self.files]
        shard = bisect.bisect_right(self.offsets, i) - 1
        return self._maps[shard][i - self.offsets[shard]]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # a worker process opens its own maps


@dataclass(frozen=True)
class StreamMix:
    """One pass over the stream (a Lightning epoch): rows per language and how often each side's rows are used."""

    tc_rows: int
    en_rows: int
    samples: int
    tc_samples: int

    @property
    def tc_share(self) -> float:
        return self.tc_samples / max(1, self.samples)

    @property
    def tc_passes(self) -> float:
        return self.tc_samples / self.tc_rows if self.tc_rows else 0.0

    @property
    def en_passes(self) -> float:
        return (self.samples - self.tc_samples) / self.en_rows if self.en_rows else 0.0


class MixedStream(Dataset):
    """Map-style view of the infinite stream: ``dataset[g]`` is global sample ``g`` (``input_ids``, ``labels``)."""

    def __init__(self, prepared: PreparedTokens, tc_ratio: float, seed: int):
        if not 0.0 <= tc_ratio <= 1.0:
            raise ValueError(f"tc_ratio must be in [0, 1], got {tc_ratio}")
        self.prepared = prepared
        self.ratio = Fraction(tc_ratio).limit_denominator(1_000_000)
        self.seed = seed
        langs = prepared.manifest["languages"]
        self.rows = {lang: TokenRows(prepared, lang) for lang in ("tc", "en") if lang in langs}
        for lang, needed in (("tc", self.ratio > 0), ("en", self.ratio < 1)):
            if needed and len(self.rows.get(lang, ())) == 0:
                raise ValueError(
                    f"tc_ratio={tc_ratio} asks for {lang.upper()} rows but its training text packs into none"
                )
        self._perm: dict[tuple[str, int], np.ndarray] = {}

    def tc_before(self, g: int) -> int:
        """TC samples among global samples ``0 .. g-1``."""
        return (g * self.ratio.numerator) // self.ratio.denominator

    def source(self, g: int) -> tuple[str, int]:
        """``(language, row)`` of global sample ``g``."""
        k = self.tc_before(g)
        lang, k = ("tc", k) if self.tc_before(g + 1) > k else ("en", g - k)
        n = len(self.rows[lang])
        return lang, int(self._permutation(lang, k // n)[k % n])

    def _permutation(self, lang: str, epoch: int) -> np.ndarray:
        key = (lang, epoch)
        if key not in self._perm:
            if len(self._perm) > 4:  # a rank moves forward through passes: keep the last few
                self._perm.clear()
            rng = np.random.default_rng([self.seed, 0 if lang == "tc" else 1, epoch])
            self._perm[key] = rng.permutation(len(self.rows[lang]))
        return self._perm[key]

    def samples_per_pass(self) -> int:
        """Global samples after which the side limiting the mix has been read once (a Lightning epoch's size)."""
        if self.ratio == 1:
            return len(self.rows["tc"])
        if self.ratio == 0:
            return len(self.rows["en"])
        tc_limit = int(len(self.rows["tc"]) / self.ratio)
        en_limit = int(len(self.rows["en"]) / (1 - self.ratio))
        return max(tc_limit, en_limit)

    def mix(self) -> StreamMix:
        n = self.samples_per_pass()
        rows = {lang: len(self.rows.get(lang, ())) for lang in ("tc", "en")}
        return StreamMix(rows["tc"], rows["en"], n, self.tc_before(n))

    def __len__(self) -> int:
        return self.samples_per_pass()

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        lang, row = self.source(int(g))
        ids = torch.from_numpy(self.rows[lang][row].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class StreamSampler(DistributedSampler):
    """This rank's global sample indices, one Lightning epoch per ``iter``, continuing from the resume point.

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP (it wraps any other sampler in one
    that would split the indices again). An epoch is ``n = samples_per_pass // (B*W)`` global batches: epoch ``e``
    of an uninterrupted run is batches ``[e*n, (e+1)*n)``. Resumed at sample ``s``, the first epoch runs from
    the batch holding ``s`` to the end of that epoch, and the stream goes on from there; Lightning's epoch number
    is not used, so a resume with another ``W`` (another ``n``) continues the same samples.
    """

    def __init__(
        self,
        dataset: MixedStream,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        start_sample: int = 0,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.batches_per_epoch = max(1, dataset.samples_per_pass() // self.global_batch)
        self.next_batch = -(-start_sample // self.global_batch)  # a partial global batch is not replayed

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self):
        first = self.next_batch
        end = (first // self.batches_per_epoch + 1) * self.batches_per_epoch
        self.next_batch = end
        for b in range(first, end):
            start = b * self.global_batch + self.rank * self.batch_size
            yield from range(start, start + self.batch_size)
