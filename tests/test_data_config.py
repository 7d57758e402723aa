"""The data package's typed config: range checks in ``__post_init__`` (ConfigError naming the key, the value and
what was expected), the composed config converting to it, and the library refusing anything untyped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from bailong.cache import cache_key
from bailong.data.chat import load_conversations
from bailong.data.config import (
    ChatCorpusConfig,
    ChatDataConfig,
    CorpusConfig,
    DataConfig,
    DedupConfig,
    InstructConfig,
    data_config_from_yaml,
)
from bailong.data.corpus import iter_documents, load_documents, split_keys
from bailong.data.dedup import make_deduplicator
from bailong.data.instruct import build_instruct_set
from bailong.data.pretrain import PretrainDataModule
from bailong.data.sft import SFTDataModule, load_chat_splits
from bailong.data.splits import load_splits
from bailong.errors import ConfigError
from conftest import compose_config


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (DataConfig, {"tc_ratio": 1.5}, "data.tc_ratio=1.5: expected a number in [0, 1]"),
        (DataConfig, {"tc_ratio": -0.1}, "data.tc_ratio=-0.1"),
        (DataConfig, {"val_fraction": 0.0}, "data.val_fraction=0.0: expected a number in (0, 1)"),
        (DataConfig, {"val_fraction": 1.0}, "data.val_fraction=1.0"),
        (DataConfig, {"seq_len": 1}, "data.seq_len=1: expected an integer >= 2"),
        (DataConfig, {"batch_size": 0}, "data.batch_size=0: expected an integer >= 1"),
        (DataConfig, {"num_workers": -1}, "data.num_workers=-1: expected an integer >= 0"),
        (DataConfig, {"max_val_chars": 0}, "data.max_val_chars=0: expected null or an integer >= 1"),
        (DedupConfig, {"near": 0.0}, "data.dedup.near=0.0: expected null (exact only) or a Jaccard threshold"),
        (DedupConfig, {"near": 1.5}, "data.dedup.near=1.5"),
        (DedupConfig, {"num_perm": 4}, "data.dedup.num_perm=4: expected an integer >= 16"),
        (DedupConfig, {"ngram": 0}, "data.dedup.ngram=0: expected a positive number"),
        (CorpusConfig, {"path": "a.jsonl", "max_docs": 0}, "corpus path=a.jsonl: max_docs=0: expected null or an"),
        (CorpusConfig, {"path": "a.csv", "format": "csv"}, "corpus path=a.csv: format='csv': expected one of txt"),
        (CorpusConfig, {"path": "a.jsonl", "text_field": ""}, "corpus path=a.jsonl: text_field='': expected a non-"),
        (CorpusConfig, {"path": ""}, "corpus path=: path='': expected a non-empty string"),
        (ChatCorpusConfig, {"path": "c.jsonl", "max_records": 0}, "chat corpus path=c.jsonl: max_records=0"),
        (ChatCorpusConfig, {"path": "c.txt", "format": "txt"}, "chat corpus path=c.txt: format='txt': expected one"),
        (ChatCorpusConfig, {"path": "c.jsonl", "messages_field": " "}, "chat corpus path=c.jsonl: messages_field"),
        (InstructConfig, {"en_share": 1.2}, "data.chat.instruct.en_share=1.2: expected a number in [0, 1]"),
        (InstructConfig, {"multi_turn_share": -0.5}, "data.chat.instruct.multi_turn_share=-0.5"),
        (InstructConfig, {"system_share": 2}, "data.chat.instruct.system_share=2"),
        (InstructConfig, {"max_train": -1}, "data.chat.instruct.max_train=-1: expected null or an integer >= 0"),
        (InstructConfig, {"max_val": -1}, "data.chat.instruct.max_val=-1"),
        (ChatDataConfig, {"max_val": -1}, "data.chat.max_val=-1: expected an integer >= 0"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_the_range(cls, kwargs, message):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert message in str(err.value)


def test_the_ranges_include_their_bounds_and_null():
    DataConfig(tc_ratio=0.0, seq_len=2, batch_size=1, num_workers=0, max_val_chars=None)
    DataConfig(tc_ratio=1.0, max_val_chars=1)
    DedupConfig(near=1.0, num_perm=16, ngram=1)
    DedupConfig(near=None)
    CorpusConfig(path="a", max_docs=1, format="hub")
    ChatCorpusConfig(path="a", max_records=1, format="jsonl")
    InstructConfig(en_share=0, multi_turn_share=1, system_share=1, max_train=0, max_val=None)
    ChatDataConfig(max_val=0)


def test_unresolved_values_are_left_for_the_resolved_config():
    """OmegaConf builds defaults with MISSING and interpolations; only the resolved values are checked."""
    DataConfig(tc_ratio="???", seq_len="${oc.env:SEQ_LEN}")
    CorpusConfig(max_docs="${data.max_docs}")
    InstructConfig(en_share="???")


@pytest.mark.parametrize(
    "overrides",
    [[], ["experiment=sft"], ["data=hub_example"], ["data=hub_chat_example"], ["data=hub_bailong_mix"]],
)
def test_composed_configs_convert_to_the_typed_config(overrides):
    data = OmegaConf.to_object(compose_config(overrides).data)
    assert isinstance(data, DataConfig) and isinstance(data.dedup, DedupConfig)
    assert data.tc and all(isinstance(spec, CorpusConfig) for spec in data.tc + data.en)
    if "experiment=sft" in overrides:
        assert isinstance(data.chat, ChatDataConfig) and isinstance(data.chat.instruct, InstructConfig)
        assert data.chat.instruct.poems.endswith("poetry_tang.jsonl.gz") and "${" not in data.chat.instruct.poems
    if overrides in ([], ["experiment=sft"], ["data=hub_chat_example"]):  # pretrain_tc and the configs built on it
        assert data.tc[0].path.endswith("poetry_tang.jsonl.gz") and data.tc[0].group_by == ["title", "author"]
        assert (data.dedup.group, data.dedup.engine, data.dedup.near) == (0.4, "memory", None)
    if overrides == ["data=hub_bailong_mix"]:  # datatrove dedup, which cannot group
        assert (data.dedup.engine, data.dedup.group) == ("datatrove", None)


def test_the_default_data_config_without_hydra_is_the_composed_one(tmp_path):
    """Scripts outside run.py (experiments/build_mini_base.py, python -m bailong.data.instruct) read
    conf/data/pretrain_tc.yaml with data_config_from_yaml: the same DataConfig, so the same prepared split."""
    root = Path(__file__).resolve().parents[1]
    data = data_config_from_yaml(root / "conf" / "data" / "pretrain_tc.yaml", root / "data")
    assert data == OmegaConf.to_object(compose_config([]).data)
    with pytest.raises(ConfigError, match="sft_chat.yaml: has a defaults list"):
        data_config_from_yaml(root / "conf" / "data" / "sft_chat.yaml", root / "data")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.tc_ratio=1.5"], "data.tc_ratio=1.5"),
        (["data.dedup.near=2"], "data.dedup.near=2.0"),
        (["data.tc.0.max_docs=0"], "max_docs=0"),
        (["experiment=sft", "data.chat.max_val=-1"], "data.chat.max_val=-1"),
        (["experiment=sft", "data.chat.instruct.system_share=3"], "data.chat.instruct.system_share=3.0"),
    ],
)
def test_a_bad_override_fails_when_the_config_is_converted(overrides, key):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        OmegaConf.to_object(cfg.data)


def test_the_library_refuses_untyped_configs(tmp_path):
    """A dict or a DictConfig fails at the public function, naming the class it expected."""
    cfg = compose_config([])
    spec = {"path": str(tmp_path / "a.jsonl")}
    calls = [
        (lambda: list(iter_documents(spec)), "CorpusConfig, got dict"),
        (lambda: load_documents([spec]), "CorpusConfig, got dict"),
        (lambda: load_documents(CorpusConfig(path="a.jsonl")), "expected a list of CorpusConfig"),
        (lambda: load_conversations(spec), "ChatCorpusConfig, got dict"),
        (lambda: make_deduplicator(cfg.data.dedup), "DedupConfig, got DictConfig"),
        (lambda: load_splits(cfg.data), "DataConfig, got DictConfig"),
        (lambda: load_chat_splits(cfg.data, tmp_path), "DataConfig, got DictConfig"),
        (lambda: PretrainDataModule.from_config(None, cfg.data, seed=0), "DataConfig, got DictConfig"),
        (lambda: SFTDataModule.from_config(None, cfg.data, [], [], seed=0), "DataConfig, got DictConfig"),
        (lambda: build_instruct_set({"poems": "p"}, data=DataConfig(), prepared=None, out_dir=tmp_path), "Instruct"),
        (lambda: build_instruct_set(InstructConfig(), data=cfg.data, prepared=None, out_dir=tmp_path), "DataConfig"),
    ]
    for call, message in calls:
        with pytest.raises(TypeError, match=message) as err:
            call()
        assert "OmegaConf.to_object" in str(err.value) or "list of" in str(err.value)


def test_sft_data_from_the_typed_config(tmp_path):
    """load_chat_splits and SFTDataModule.from_config read the converted ``data.chat`` (instruct set and files)."""
    chats = tmp_path / "chats.jsonl"
    user = {"role": "user", "content": "hi"}
    lines = (json.dumps({"messages": [user, {"role": "assistant", "content": f"hello {i}"}]}) for i in range(30))
    chats.write_text("".join(line + "\n" for line in lines))
    overrides = [
        "experiment=sft",
        "data.chat.instruct.max_train=20",
        "data.chat.instruct.max_val=3",
        f"data.chat.files=[{{path: '{chats}', max_records: 10}}]",
        "data.chat.packing=false",
        "data.batch_size=2",
        "data.val_fraction=0.2",  # the chat file's 10 records: some in each split
        "data.test_fraction=0.2",
        *[f"data.{lang}.{i}.max_docs=150" for lang, n in (("tc", 3), ("en", 2)) for i in range(n)],  # quick to prepare
    ]
    data = OmegaConf.to_object(compose_config(overrides).data)
    assert isinstance(data.chat.files[0], ChatCorpusConfig)
    train, val = load_chat_splits(data, tmp_path / "cache")
    # 20 + 3 generated conversations (max_train, max_val) and the file's first 10 records split three ways: its
    # train records train, its dev records validate, its test records are in neither
    records = load_conversations(data.chat.files[0])
    split = split_keys([cache_key(c) for c in records], data.split_seed, data.val_fraction, data.test_fraction)
    assert {"train", "dev", "test"} <= set(split)
    assert [c for c in train if c in records] == [c for c, s in zip(records, split) if s == "train"]
    assert [c for c in val if c in records] == [c for c, s in zip(records, split) if s == "dev"]
    assert len(train) == 20 + split.count("train") and len(val) == 3 + split.count("dev")
    dm = SFTDataModule.from_config(SimpleNamespace(pad_token_id=0, eos_token_id=2), data, train, val, seed=5)
    assert (dm.seq_len, dm.batch_size, dm.packing, dm.seed) == (data.seq_len, 2, False, 5)
