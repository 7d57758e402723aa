"""Packing and the TC/EN mix: exact token streams, EOS between documents, the token share, determinism."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bailong.config import DataConfig
from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents
from bailong.data.packing import (
    EpochShuffleSampler,
    pack_documents,
    pack_mixture,
    plan_mix,
    special_token_ids,
    tokenize_documents,
)
from bailong.data.pretrain import PretrainDataModule

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def tiny_corpora() -> tuple[list[str], list[str]]:
    """A few hundred real TC and EN documents (long modern/KJV documents included)."""
    tc = load_documents(
        [
            CorpusConfig(path=str(DATA / "zh_tw/poetry_tang.jsonl.gz"), max_docs=200),
            CorpusConfig(path=str(DATA / "zh_tw/modern.jsonl.gz"), max_docs=40),
        ]
    )
    en = load_documents(
        [
            CorpusConfig(path=str(DATA / "en/fortunes.jsonl.gz"), max_docs=200),
            CorpusConfig(path=str(DATA / "en/kjv.jsonl.gz"), max_docs=10),
        ]
    )
    return tc, en


def build_tiny_tokenizer(directory: Path):
    """A 1,500-piece SentencePiece BPE with byte fallback in Llama's layout (<unk>, <s>, </s>,
    identity normalisation), loaded the way the project loads Llama tokenizers."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    tc, en = tiny_corpora()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([d[:2000] for d in tc + en]),
        model_writer=model,
        model_type="bpe",
        vocab_size=1500,
        character_coverage=0.98,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        max_sentence_length=100000,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpora():
    return tiny_corpora()


@pytest.fixture(scope="module")
def token_docs(tokenizer, corpora):
    tc, en = corpora
    return tokenize_documents(tokenizer, tc), tokenize_documents(tokenizer, en)


def test_batched_tokenization_equals_one_document_at_a_time(tokenizer, corpora):
    docs = corpora[0][:30] + corpora[1][:30]
    batched = tokenize_documents(tokenizer, docs, batch_docs=7)  # several batches, a short last one
    for doc, ids in zip(docs, batched):
        assert ids.tolist() == tokenizer(doc, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids.tolist()) == doc  # byte fallback: nothing lost


def test_packed_rows_reconstruct_the_stream_with_eos_between_documents(tokenizer, token_docs):
    bos, eos = special_token_ids(tokenizer)
    docs = token_docs[0][:50] + token_docs[1][:50]
    stream = np.concatenate([np.concatenate([[bos], d, [eos]]) for d in docs])
    packed = pack_documents(docs, 64, bos, eos)
    assert packed.shape == (len(stream) // 64, 64)  # no padding; only the tail shorter than a row is dropped
    assert len(stream) - packed.numel() < 64
    assert packed.flatten().tolist() == stream[: packed.numel()].tolist()
    flat = packed.flatten()
    # every document boundary inside the kept stream is EOS followed by BOS
    boundaries = np.cumsum([len(d) + 2 for d in docs])
    for end in boundaries[boundaries < packed.numel()]:
        assert flat[end - 1] == eos and flat[end] == bos
    assert int((flat == eos).sum()) == int((boundaries <= packed.numel()).sum())


def test_pack_rejects_too_little_text():
    with pytest.raises(ValueError, match="too small to pack"):
        pack_documents([np.array([5, 6], dtype=np.int32)], 64, 1, 2)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8, 0.95])
def test_mix_meets_the_tc_token_share(token_docs, ratio):
    tc_len = [len(d) + 2 for d in token_docs[0]]
    en_len = [len(d) + 2 for d in token_docs[1]]
    plan = plan_mix(tc_len, en_len, ratio, seed=0)
    total = plan.tc_tokens + plan.en_tokens
    # exact up to one document of the repeated side
    assert abs(plan.tc_share - ratio) <= max(tc_len + en_len) / total
    # the side with more than its share is used exactly once; the other is repeated, evenly
    counts = {lang: Counter(i for doc_lang, i in plan.docs if doc_lang == lang) for lang in ("tc", "en")}
    limiting = "tc" if plan.tc_passes == 1.0 else "en"
    assert (plan.tc_passes if limiting == "en" else plan.en_passes) >= 1.0
    assert sorted(counts[limiting]) == list(range(len(tc_len if limiting == "tc" else en_len)))
    assert set(counts[limiting].values()) == {1}
    repeated = counts["en" if limiting == "tc" else "tc"]
    assert max(repeated.values()) - min(repeated.values()) <= 1


def test_single_language_mixes_and_bad_ratios(token_docs):
    tc_len = [len(d) + 2 for d in token_docs[0]]
    only_tc = plan_mix(tc_len, [], 1.0, seed=0)
    assert only_tc.en_tokens == 0 and only_tc.tc_passes == 1.0 and len(only_tc.docs) == len(tc_len)
    assert plan_mix([], tc_len, 0.0, seed=0).tc_tokens == 0
    with pytest.raises(ValueError, match="tc_ratio must be in"):
        plan_mix(tc_len, tc_len, 1.2, seed=0)
    with pytest.raises(ValueError, match="EN training corpus is empty"):
        plan_mix(tc_len, [], 0.5, seed=0)


def test_mixture_is_deterministic_in_the_seed_and_follows_the_plan(tokenizer, token_docs):
    bos, eos = special_token_ids(tokenizer)
    tc, en = token_docs
    kwargs = dict(seq_len=48, tc_ratio=0.7, bos_id=bos, eos_id=eos)
    a, plan_a = pack_mixture(tc, en, seed=3, **kwargs)
    b, plan_b = pack_mixture(tc, en, seed=3, **kwargs)
    c, _ = pack_mixture(tc, en, seed=4, **kwargs)
    assert torch.equal(a, b) and plan_a == plan_b
    assert not torch.equal(a, c)
    stream = np.concatenate(
        [np.concatenate([[bos], (tc if lang == "tc" else en)[i], [eos]]) for lang, i in plan_a.docs]
    )
    assert a.flatten().tolist() == stream[: a.numel()].tolist()


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed run gets the same order back
    assert list(EpochShuffleSampler(50, seed=8)) != first


def make_datamodule(tokenizer, corpora, **overrides):
    tc, en = corpora
    kwargs = dict(seq_len=64, batch_size=4, tc_ratio=0.8, seed=0)
    kwargs.update(overrides)
    return PretrainDataModule(tokenizer, tc[:-20], en[:-20], tc[-20:], en[-20:], **kwargs)


def test_train_loader_yields_full_packed_batches_in_a_seeded_order(tokenizer, corpora):
    dm = make_datamodule(tokenizer, corpora)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = list(loader.sampler)
    assert sorted(order) == list(range(len(dm.train_sequences)))
    batches = list(loader)
    assert len(batches) == dm.train_batches_per_epoch == len(order) // 4  # drop_last: full batches only
    assert dm.train_tokens_per_epoch == len(batches) * 4 * 64
    for k, batch in enumerate(batches):
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["input_ids"], dm.train_sequences[order[4 * k : 4 * k + 4]].long())
        assert torch.equal(batch["input_ids"], batch["labels"])
    assert abs(dm.mix.tc_share - 0.8) < 0.02
    again = make_datamodule(tokenizer, corpora)
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], batches[0]["input_ids"])
    other = make_datamodule(tokenizer, corpora, seed=1)
    assert not torch.equal(next(iter(other.train_dataloader()))["input_ids"], batches[0]["input_ids"])


def test_datamodule_rejects_bad_input(tokenizer, corpora):
    tc, en = corpora
    with pytest.raises(ValueError, match="no en validation documents"):
        PretrainDataModule(tokenizer, tc, en, tc[:2], [], seq_len=64, batch_size=4, tc_ratio=0.8, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        PretrainDataModule(
            tokenizer, tc[:2], en[:2], tc[:2], en[:2], seq_len=256, batch_size=64, tc_ratio=0.5, seed=0
        ).setup("fit")


@pytest.mark.parametrize("name", ["pretrain_tc", "hub_example"])
def test_data_configs_fit_the_schema(name):
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / f"conf/data/{name}.yaml"))
    cfg = OmegaConf.create({"paths": {"data_dir": str(DATA)}, "data": data})
    resolved = OmegaConf.to_container(cfg.data, resolve=True)
    assert resolved["tc"] and resolved["en"] and 0 < resolved["tc_ratio"] < 1
    if name == "pretrain_tc":
        for spec in resolved["tc"] + resolved["en"]:
            assert Path(spec["path"]).is_file(), spec["path"]


def test_datamodule_from_the_shipped_config(tokenizer):
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf/data/pretrain_tc.yaml"))
    cfg = OmegaConf.create({"paths": {"data_dir": str(DATA)}, "data": data})
    for spec in list(cfg.data.tc) + list(cfg.data.en):
        spec.max_docs = 60  # the real files, a sliver of each
    cfg.data.val_fraction = 0.1
    dm = PretrainDataModule.from_config(tokenizer, OmegaConf.to_object(cfg.data), seed=0)
    dm.setup("fit")
    assert dm.train_tokens_per_epoch > 0
    assert 0 < dm.val_chars["tc"] <= cfg.data.max_val_chars and 0 < dm.val_chars["en"] <= cfg.data.max_val_chars
    assert abs(dm.mix.tc_share - cfg.data.tc_ratio) < 0.05
