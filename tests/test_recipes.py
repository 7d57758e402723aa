"""The real-scale recipes compose against the schema with the paper's numbers, and their hub corpora
load through the same code path (datasets, streaming, s2twp, dedup) on local files."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from bailong.data.splits import load_splits
from conftest import compose_config


def test_bailong_7b_recipe(tmp_path):
    cfg = compose_config(["experiment=bailong_7b"], tmp_path)
    assert cfg.model.pretrained == "meta-llama/Llama-2-7b-hf"
    assert 32000 + cfg.tokenizer.added_vocab == 59241
    assert cfg.quant.name == "nf4" and cfg.lora.r == 64 and cfg.data.seq_len == 2048
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.trainer.accelerator == "gpu" and cfg.train.gradient_checkpointing
    assert 0.5 < cfg.data.tc_ratio < 1.0  # TC-heavy, a minor English share
    assert cfg.data.dedup.exact and cfg.data.dedup.near == 0.8
    wiki = next(c for c in cfg.data.tc if "wikipedia" in c.path)
    assert wiki.format == "hub" and wiki.streaming and wiki.convert == "s2twp" and wiki.max_docs
    assert all(c.streaming and c.max_docs for c in [*cfg.data.tc, *cfg.data.en])


def test_bailong_instruct_7b_recipe(tmp_path):
    cfg = compose_config(["experiment=bailong_instruct_7b", "sft.from_run=/runs/bailong_7b"], tmp_path)
    assert cfg.stage == "sft" and cfg.sft.from_run == "/runs/bailong_7b"
    assert cfg.model.name == "llama2_7b" and cfg.lora.r == 64 and cfg.tokenizer.added_vocab == 27241
    assert any(f.format == "hub" for f in cfg.data.chat.files)
    assert cfg.data.seq_len == 2048 and cfg.train.gradient_checkpointing


def test_hub_mix_loads_through_datasets_streaming_with_conversion_and_dedup(tmp_path):
    """hub_bailong_mix with its hub ids swapped for datasets' json builder on local files (no network)."""
    zh = tmp_path / "zhwiki.jsonl"
    simplified = (
        "软件是一系列按照特定顺序组织的计算机数据和指令的集合。一般来讲软件被划分为系统软件、应用软件和介于"
        "这两者之间的中间件。软件并不只是包括可以在计算机上运行的电脑程序，与这些电脑程序相关的文件一般也被认为"
        "是软件的一部分。"
    )
    traditional_edit = (
        "軟體是一系列按照特定順序組織的計算機資料和指令的集合！一般來講軟體被劃分為系統軟體、應用軟體"
        "和介於這兩者之間的中介軟體。軟體並不只是包括可以在計算機上執行的電腦程式，與這些電腦程式相關"
        "的文件一般也被認為是軟體的一部分。"
    )
    articles = [
        simplified,
        traditional_edit,
        "台北是台湾的首都，人口约二百五十万。" * 4,
        "長江是亞洲第一長河，全長六千三百公里。" * 4,
    ]
    zh.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in articles))
    en = tmp_path / "web.jsonl"
    en.write_text("".join(json.dumps({"text": f"English page number {i}. " * 10}) + "\n" for i in range(6)))
    cfg = compose_config(
        [
            "data=hub_bailong_mix",
            f"data.tc=[{{path: json, format: hub, data_files: '{zh}', split: train, "
            f"streaming: true, convert: s2twp, max_docs: 100}}]",
            f"data.en=[{{path: json, format: hub, data_files: '{en}', split: train, streaming: true, max_docs: 5}}]",
            "data.val_fraction=0.2",
        ],
        tmp_path,
    )
    splits = load_splits(OmegaConf.to_object(cfg.data), tmp_path)
    tc = splits.tc_train + splits.tc_val + splits.tc_test
    # s2twp turned the Simplified article into Taiwan Traditional (软件→軟體, 数据→資料, 中间件→中介軟體,
    # 台湾→臺灣); the hub's Traditional copy differs from it in one character: a near-duplicate, dropped
    assert len(tc) == 3 and all("软件" not in t and "台湾" not in t for t in tc)
    assert sum("中介軟體" in t for t in tc) == 1
    assert any(t.startswith("臺北是臺灣的首都") for t in tc)
    assert len(list(splits.train_documents("en"))) + len(splits.en_val) + len(splits.en_test) == 5  # max_docs
