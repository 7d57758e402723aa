"""The prepare stage on real files: the three-way split, dedup counts, the same bytes for any number of workers and
after a kill, token shards equal to packing the text in memory, and the stream over them (mix per step, ranks'
shares, resume)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bailong.cache import cache_key
from bailong.data.config import CorpusConfig, DataConfig, DedupConfig, PrepareConfig
from bailong.data.corpus import CorpusError, _unit_hash, load_documents, write_jsonl
from bailong.data.packing import pack_documents, special_token_ids, tokenize_documents
from bailong.data.prepare import MANIFEST, STATE, _text_inputs, prepare_text, prepare_tokens, split_of
from bailong.data.shards import MixedStream, StreamSampler
from bailong.data.splits import load_splits
from test_packing import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT / "tests" / "scripts"))


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    """Real poems and fortunes, with exact copies (case and width changed) and near copies (one edit) mixed in."""
    d = tmp_path_factory.mktemp("corpora")
    poems = load_documents([CorpusConfig(path=str(DATA / "zh_tw/poetry_tang.jsonl.gz"), max_docs=600)])
    modern = load_documents([CorpusConfig(path=str(DATA / "zh_tw/modern.jsonl.gz"), max_docs=30)])
    fortunes = load_documents([CorpusConfig(path=str(DATA / "en/fortunes.jsonl.gz"), max_docs=500)])
    rng = random.Random(0)
    tc = list(poems)
    for doc in modern[:20]:  # a long document and its mirror with one character changed
        tc.insert(rng.randrange(len(tc)), doc)
        tc.insert(rng.randrange(len(tc)), doc[:100] + "。" + doc[101:])
    en = list(fortunes) + [f.upper() for f in fortunes[:40]]  # exact copies after case folding
    return {
        "tc": write_jsonl([{"text": t} for t in tc], d / "tc.jsonl"),
        "en": write_jsonl([{"text": t} for t in en], d / "en.jsonl"),
    }


def data_config(files, **prepare) -> DataConfig:
    return DataConfig(
        tc=[CorpusConfig(path=str(files["tc"]))],
        en=[CorpusConfig(path=str(files["en"]))],
        val_fraction=0.05,
        test_fraction=0.05,
        dedup=DedupConfig(exact=True, near=0.8),
        prepare=PrepareConfig(**{"shard_docs": 100, "batch_docs": 32, **prepare}),
    )


def shard_hashes(root: Path) -> dict[str, str]:
    return json.loads((root / MANIFEST).read_text())["sha256"]


@pytest.fixture(scope="module")
def prepared(corpus_files, tmp_path_factory):
    return prepare_text(data_config(corpus_files), tmp_path_factory.mktemp("cache"))


def test_text_is_split_three_ways_by_hash_after_dedup(prepared, corpus_files):
    m = prepared.manifest
    raw = {lang: [json.loads(x)["text"] for x in corpus_files[lang].read_text().splitlines()] for lang in ("tc", "en")}
    for lang, info in m["languages"].items():
        (src,) = info["sources"]
        split = {s: list(prepared.documents(lang, s)) for s in ("train", "dev", "test")}
        kept = [d for s in split.values() for d in s]
        assert src["read"] == len(raw[lang]) and src["kept"] == len(kept) == len(set(kept))
        assert src["read"] - src["kept"] == src["dedup_exact"] + src["dedup_near"]
        for s, docs in split.items():
            assert src["docs"][s] == len(docs) and src["chars"][s] == sum(map(len, docs))
            assert all(split_of(d, 0, 0.05, 0.05) == s for d in docs)
        assert split["train"] == [d for d in kept if split_of(d, 0, 0.05, 0.05) == "train"]  # corpus order kept
        assert min(len(v) for v in split.values()) > 0
    assert m["languages"]["tc"]["sources"][0]["dedup_near"] >= 15  # the 20 mirrors (LSH is soft at the edge)
    assert m["languages"]["en"]["sources"][0]["dedup_exact"] == 40
    assert len(prepared.files("tc", "train")) > 1  # several shards: resume points
    assert m["inputs"]["split_seed"] == 0 and m["inputs"]["tc"][0]["sha256"]


def test_dev_is_the_two_way_splits_validation_text():
    """The dev split is the hash range the earlier train/validation split held out: the same documents."""
    docs = [f"文件{i}：" + "春眠不覺曉" * (i % 7 + 1) for i in range(2000)]
    for doc in docs:
        assert (split_of(doc, 3, 0.02, 0.02) == "dev") == (_unit_hash(doc, 3) < 0.02)
    assert sum(split_of(d, 3, 0.02, 0.02) == "test" for d in docs) == pytest.approx(40, abs=20)


def test_the_same_bytes_for_one_or_two_workers(corpus_files, prepared, tmp_path):
    two = prepare_text(data_config(corpus_files, workers=2), tmp_path)
    assert two.root.name == prepared.root.name  # workers change the speed only, not the cache key
    assert two.root != prepared.root and shard_hashes(two.root) == shard_hashes(prepared.root)


def test_the_key_names_the_files_content_not_the_checkouts_directory(corpus_files, prepared, tmp_path):
    """The base's card records the prepared text's key: a clone elsewhere must prepare the same text under it."""
    moved = {lang: Path(shutil.copy(path, tmp_path / path.name)) for lang, path in corpus_files.items()}
    elsewhere = prepare_text(data_config(moved), tmp_path / "cache")
    assert elsewhere.root.name == prepared.root.name
    assert shard_hashes(elsewhere.root) == shard_hashes(prepared.root)
    with open(moved["en"], "ab") as fh:  # one more document: another key
        fh.write(b'{"text": "one more fortune"}\n')
    assert cache_key(_text_inputs(data_config(moved))) != prepared.root.name


def test_a_killed_prepare_resumes_to_the_same_bytes(corpus_files, prepared, tmp_path, monkeypatch):
    import bailong.data.prepare as prep

    real, calls = prep._write_jsonl_gz, []

    def dies_on_the_fourth_shard(path, texts):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill between two shards
        real(path, texts)

    monkeypatch.setattr(prep, "_write_jsonl_gz", dies_on_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_text(data_config(corpus_files), tmp_path)
    root = tmp_path / "prepared_text" / prepared.root.name
    assert not (root / MANIFEST).exists() and (root / "tc" / STATE).is_file()
    state = pickle.loads((root / "tc" / STATE).read_bytes())
    assert state.shards["train"] == 3 and state.counts[0].read > 0  # three shards taken; the rerun goes on from there
    monkeypatch.setattr(prep, "_write_jsonl_gz", real)
    resumed = prepare_text(data_config(corpus_files), tmp_path)
    assert shard_hashes(resumed.root) == shard_hashes(prepared.root)
    assert resumed.manifest["languages"] == prepared.manifest["languages"]
    assert not (root / "tc" / STATE).exists()


def test_tiny_corpora_still_hold_out_a_dev_document(tmp_path):
    path = write_jsonl([{"text": t} for t in ("一", "二", "三")], tmp_path / "tiny.jsonl")
    data = DataConfig(tc=[CorpusConfig(path=str(path))], en=[], val_fraction=0.01, test_fraction=0.0)
    text = prepare_text(data, tmp_path / "cache")
    dev = list(text.documents("tc", "dev"))
    assert dev == [min(("一", "二", "三"), key=lambda t: _unit_hash(t, 0))]
    assert sorted(dev + list(text.documents("tc", "train"))) == sorted(["一", "二", "三"])
    empty = write_jsonl([{"text": "  "}], tmp_path / "empty.jsonl")
    with pytest.raises(CorpusError, match="empty.jsonl: corpus is empty"):
        prepare_text(DataConfig(tc=[CorpusConfig(path=str(empty))]), tmp_path / "cache")


def test_load_splits_reads_the_prepared_text_capped_per_corpus(corpus_files, tmp_path):
    data = data_config(corpus_files)
    data.max_val_chars = 3000
    s = load_splits(data, tmp_path)
    assert s.prepared is not None and s.tc_train == list(s.prepared.documents("tc", "train"))
    dev = list(s.prepared.documents("tc", "dev"))
    assert s.tc_val == dev[: len(s.tc_val)] and sum(map(len, s.tc_val[:-1])) <= 3000
    assert s.tc_test and not set(s.tc_test) & set(s.tc_train) and not set(s.tc_val) & set(s.tc_train)


# -- tokens -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def token_shards(prepared, tokenizer, tmp_path_factory):
    texts = {lang: (lambda lang=lang: prepared.documents(lang, "train")) for lang in ("tc", "en")}
    kwargs = dict(seq_len=64, text_key=prepared.root.name, shard_tokens=64 * 50)
    return texts, kwargs, prepare_tokens(texts, tokenizer, cache_dir=tmp_path_factory.mktemp("tok_cache"), **kwargs)


def test_token_shards_are_the_packed_text(prepared, tokenizer, token_shards):
    _, _, shards = token_shards
    bos, eos = special_token_ids(tokenizer)
    for lang in ("tc", "en"):
        docs = tokenize_documents(tokenizer, list(prepared.documents(lang, "train")))
        expected = pack_documents(docs, 64, bos, eos).numpy()
        files = shards.files(lang)
        assert len(files) > 1 and all(np.load(f).shape[1] == 64 for f in files[:-1])
        rows = np.concatenate([np.load(f) for f in files])
        assert rows.dtype == np.uint16 and np.array_equal(rows.astype(np.int32), expected)
    assert shards.manifest["tokenizer"] and shards.manifest["languages"]["tc"]["rows"] == len(
        np.concatenate([np.load(f) for f in shards.files("tc")])
    )


def test_token_shards_resume_and_workers_give_the_same_bytes(tokenizer, token_shards, tmp_path, monkeypatch):
    import bailong.data.prepare as prep

    texts, kwargs, shards = token_shards
    two = prepare_tokens(texts, tokenizer, cache_dir=tmp_path / "two", workers=2, **kwargs)
    assert shard_hashes(two.root) == shard_hashes(shards.root)
    real, saves = prep.write_atomically, []

    def dies_after_two_shards(path, write):
        if str(path).endswith(".npy"):
            saves.append(path)
            if len(saves) == 3:
                raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(prep, "write_atomically", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(texts, tokenizer, cache_dir=tmp_path / "killed", **kwargs)
    monkeypatch.setattr(prep, "write_atomically", real)
    resumed = prepare_tokens(texts, tokenizer, cache_dir=tmp_path / "killed", **kwargs)
    assert shard_hashes(resumed.root) == shard_hashes(shards.root)


# -- the stream -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8, 0.95, 1.0])
def test_every_batch_holds_the_mix_up_to_one_row(token_shards, ratio):
    stream = MixedStream(token_shards[2], ratio, seed=0)
    langs = [stream.source(g)[0] for g in range(3 * stream.samples_per_pass())]
    for size in (4, 8, 7):
        for start in range(0, len(langs) - size, size):
            assert abs(langs[start : start + size].count("tc") - ratio * size) < 1 + 1e-9
    # each side's rows: every row once per pass over it, in a new order each pass
    for lang in ("tc", "en"):
        n = len(stream.rows[lang])
        rows = [stream.source(g)[1] for g in range(len(langs)) if langs[g] == lang]
        for p in range(len(rows) // n):
            assert sorted(rows[p * n : (p + 1) * n]) == list(range(n))
        if len(rows) >= 2 * n:
            assert rows[:n] != rows[n : 2 * n]


def test_ranks_read_disjoint_shares_that_cover_the_stream(token_shards):
    stream = MixedStream(token_shards[2], 0.8, seed=0)
    one = list(StreamSampler(stream, 8))
    shares = [list(StreamSampler(stream, 4, num_replicas=2, rank=r)) for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(one) == list(range(len(one)))
    # batch b of rank r is the r-th half of global batch b: together, the one process's batch b
    for b in range(len(one) // 8):
        assert sorted(shares[0][4 * b : 4 * b + 4] + shares[1][4 * b : 4 * b + 4]) == one[8 * b : 8 * b + 8]


def test_a_resumed_sampler_continues_the_same_samples_on_any_number_of_ranks(token_shards):
    stream = MixedStream(token_shards[2], 0.8, seed=0)
    full = StreamSampler(stream, 8)
    epochs = [list(full) for _ in range(3)]  # three epochs, uninterrupted
    flat = [g for e in epochs for g in e]
    consumed = 8 * 5  # killed after 5 steps of 8 samples
    resumed = StreamSampler(stream, 8, start_sample=consumed)
    assert list(resumed) == epochs[0][consumed:]  # the rest of the interrupted epoch
    assert list(resumed) == epochs[1]  # then the same epochs as without the kill
    # resumed on 2 ranks of 4 samples: the same global samples from the same point on
    ranks = [StreamSampler(stream, 4, num_replicas=2, rank=r, start_sample=consumed) for r in range(2)]
    got = []
    for _ in range(2):
        parts = [list(s) for s in ranks]
        for b in range(len(parts[0]) // 4):
            got += sorted(parts[0][4 * b : 4 * b + 4] + parts[1][4 * b : 4 * b + 4])
    assert got[:200] == flat[consumed : consumed + 200]
    # the rows behind the indices do not depend on the sampler: the stream is a pure function of (seed, g)
    again = MixedStream(token_shards[2], 0.8, seed=0)
    for g in (0, 17, consumed, len(flat) - 1):
        assert torch.equal(again[g]["input_ids"], stream[g]["input_ids"])


def run_ranks(out: Path, devices: int, batch_size: int, steps: int, ckpt: Path | None = None) -> list[torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29523"}
    args = [sys.executable, str(ROOT / "tests/scripts/ddp_shards.py"), str(out), str(devices), str(batch_size)]
    args += [str(steps)] + ([str(ckpt)] if ckpt else [])
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_and_a_resume_on_one_continues_them(tmp_path):
    """Lightning + DDP (gloo, 2 CPU processes): each rank's batches are its part of the stream's global batches;
    killed after step 3 and resumed on one process with the same global batch, the run reads what both ranks
    would have read next."""
    from ddp_shards import datamodule

    ranks = run_ranks(tmp_path / "two", 2, 4, 6)
    stream = datamodule(tmp_path / "two" / "cache", 8).stream  # the same shards, read in this process
    # rank r's step s is global samples 8s + 4r .. 8s + 4r + 3: disjoint shares that together cover 0 .. 47
    for step in range(6):
        for r in range(2):
            expected = torch.stack([stream[step * 8 + r * 4 + j]["input_ids"] for j in range(4)])
            assert torch.equal(ranks[r][step], expected)
    (ckpt,) = (tmp_path / "two" / "ckpt").glob("*step=3.ckpt")
    (resumed,) = run_ranks(tmp_path / "one", 1, 8, 6, ckpt)
    assert len(resumed) == 3  # steps 4..6 only
    for k, step in enumerate(range(3, 6)):
        assert torch.equal(resumed[k], torch.cat([ranks[0][step], ranks[1][step]]))


def split_with_grouping(path: Path, group: float | None, cache: Path) -> tuple[dict[str, str], dict]:
    """One TC corpus prepared with 30% dev, 30% test and dedup.group=``group``: each kept text's split, and the
    corpus's manifest record."""
    data = DataConfig(
        tc=[CorpusConfig(path=str(path))],
        val_fraction=0.3,
        test_fraction=0.3,
        dedup=DedupConfig(exact=True, near=0.9, group=group),
    )
    text = prepare_text(data, cache)
    (src,) = text.manifest["languages"]["tc"]["sources"]
    return {d: s for s in ("train", "dev", "test") for d in text.documents("tc", s)}, src


def test_near_duplicate_variants_share_a_split(tmp_path):
    """A variant of a document (estimated Jaccard ~0.6: kept, under dedup's 0.9) follows the first copy's split with
    data.dedup.group=0.5, whatever its own hash says; without grouping it goes by its own hash."""
    from bailong.data.dedup import jaccard

    poem = load_documents([CorpusConfig(path=str(DATA / "zh_tw/modern.jsonl.gz"), max_docs=1)])[0][:600]
    rng = random.Random(0)
    variant = None
    for _ in range(500):  # edits that keep it similar but send it to another split by its own hash
        chars = list(poem)
        for i in rng.sample(range(len(chars)), len(chars) // 14):
            chars[i] = "的"
        candidate = "".join(chars)
        if split_of(candidate, 0, 0.3, 0.3) != split_of(poem, 0, 0.3, 0.3) and 0.5 < jaccard(poem, candidate) < 0.8:
            variant = candidate
            break
    assert variant is not None
    path = write_jsonl([{"text": poem}, {"text": variant}], tmp_path / "pair.jsonl")

    def splits(group):
        where, src = split_with_grouping(path, group, tmp_path / f"cache{group}")
        return where[poem], where[variant], src

    first, second, src = splits(0.5)
    assert first == second == split_of(poem, 0, 0.3, 0.3) and src["grouped"] == 1 and src["kept"] == 2
    first, second, src = splits(None)
    assert first != second and src["grouped"] == 0


def test_documents_longer_than_a_shard_fill_several(prepared, tokenizer, tmp_path):
    bos, eos = special_token_ids(tokenizer)
    docs = [d for d in prepared.documents("tc", "train") if len(d) > 400][:5]
    texts = {"tc": lambda: iter(docs)}
    shards = prepare_tokens(texts, tokenizer, seq_len=16, cache_dir=tmp_path, text_key="long", shard_tokens=64)
    rows = np.concatenate([np.load(f) for f in shards.files("tc")])
    expected = pack_documents(tokenize_documents(tokenizer, docs), 16, bos, eos).numpy()
    assert len(shards.files("tc")) > 2 * len(docs) and np.array_equal(rows.astype(np.int32), expected)
    assert shards.manifest["languages"]["tc"]["shard_rows"] == [len(np.load(f)) for f in shards.files("tc")]


def test_the_prepare_stage_leaves_what_the_training_run_reads(tmp_path):
    """``stage=prepare`` writes text and token shards to the cache and reports them; the training run's data module,
    built from the same config and cache, streams those very shards (it prepares nothing)."""
    from omegaconf import OmegaConf

    from bailong.config import compose_config
    from bailong.data.pretrain import PretrainDataModule
    from bailong.stages import run
    from bailong.stages.common import build_tokenizers

    overrides = [
        "stage=prepare",
        "tokenizer.added_vocab=0",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.tc_sample_docs=50",
        *[f"data.tc.{i}.max_docs=200" for i in range(3)],
        *[f"data.en.{i}.max_docs=200" for i in range(2)],
    ]
    cfg = compose_config(overrides, tmp_path / "run")
    metrics = run(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert metrics["data/tc_sample_docs"] == 50 and metrics["data/tc_sample_of_docs"] == metrics["data/tc_train_docs"]
    assert metrics["data/tc_train_docs"] + metrics["data/tc_dev_docs"] + metrics["data/tc_test_docs"] == 600
    token_dir = Path(metrics["data/token_dir"])
    assert (token_dir / MANIFEST).is_file() and (Path(metrics["data/text_dir"]) / MANIFEST).is_file()
    stamp = (token_dir / MANIFEST).stat().st_mtime_ns
    splits = load_splits(OmegaConf.to_object(cfg.data), cfg.paths.cache_dir)
    _, _, _, tok = build_tokenizers(cfg, splits)
    dm = PretrainDataModule.from_config(
        tok, OmegaConf.to_object(cfg.data), seed=cfg.seed, splits=splits, cache_dir=cfg.paths.cache_dir
    )
    assert dm.stream.prepared.root == token_dir and (token_dir / MANIFEST).stat().st_mtime_ns == stamp
    assert len(dm.stream.rows["tc"]) == metrics["data/tc_rows"]
