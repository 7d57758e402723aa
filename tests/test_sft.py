"""The SFT stage: config errors before heavy work; a smoke SFT from a pre-trained smoke run's directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bailong.checks import ConfigError
from conftest import compose_config

SFT_SMOKE = [
    "experiment=sft",
    "logger=csv",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "train.warmup_steps=1",
    "train.checkpoint_every_n_steps=2",
    "data.seq_len=128",
    "data.batch_size=4",
    "data.max_val_chars=2000",
    "data.chat.instruct.max_train=200",
    "data.chat.instruct.max_val=8",
    "data.chat.max_val=8",
    "mc.items_per_lang=12",
    "bench.max_prompts=4",
    "bench.max_new_tokens=8",
    "parallel.max_pairs=8",
    "parallel.translate_pairs=2",
    "parallel.max_new_tokens=8",
]


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading a model or data fails the test: config errors must come first."""
    import bailong.stages.sft as sft

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the config was checked")

    for name in ("load_adapter", "start_from_base", "load_chat_splits", "load_splits"):
        monkeypatch.setattr(sft, name, heavy)


def test_missing_from_run_is_a_config_error_naming_the_key(tmp_path, no_heavy_work):
    from bailong.stages import run

    with pytest.raises(ConfigError, match=r"sft\.from_run is not set.*sft\.from_base=true"):
        run(compose_config(["experiment=sft"], tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sft.from_run=/nonexistent/run"], r"sft\.from_run='/nonexistent/run': no adapter there"),
        (["sft.from_run=/x", "sft.from_base=true"], "choose one start"),
        (["data=pretrain_tc", "sft.from_base=true"], r"data\.chat is not set"),
    ],
)
def test_bad_sft_settings_fail_first(tmp_path, no_heavy_work, overrides, message):
    from bailong.stages import run

    with pytest.raises(ConfigError, match=message):
        run(compose_config(["experiment=sft", *overrides], tmp_path))


def test_sft_config_composes_with_the_schema(tmp_path):
    cfg = compose_config(["experiment=sft", "sft.from_run=x"], tmp_path)
    assert cfg.stage == "sft" and cfg.task_name == "sft" and cfg.data.chat.packing
    assert cfg.data.chat.instruct.poems.endswith("data/zh_tw/poetry_tang.jsonl.gz")
    assert cfg.data.tc[0].path.endswith("poetry_tang.jsonl.gz")  # held-out split shared with pre-training
    hub = compose_config(["experiment=sft", "data=hub_chat_example"], tmp_path)
    assert [f.path for f in hub.data.chat.files] == ["yentinglin/TaiwanChat", "HuggingFaceH4/ultrachat_200k"]
    with pytest.raises(Exception, match="from_runn"):
        compose_config(["experiment=sft", "sft.from_runn=x"], tmp_path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from bailong.stages import run

    out = tmp_path_factory.mktemp("pretrain")
    run(compose_config(["experiment=smoke", "logger=csv"], out))
    return out


@pytest.mark.slow
def test_sft_smoke_from_a_pretrained_run(pretrained, tmp_path):
    from bailong.data.chat import CHAT_TEMPLATE
    from bailong.model.adapter import load_adapter
    from bailong.stages import run

    cfg = compose_config([*SFT_SMOKE, f"sft.from_run={pretrained}"], tmp_path)
    metrics = run(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["sft/source"] == str(pretrained / "adapter") and metrics["train/steps"] == 4
    for stage in ("before", "after"):
        for key in (
            "mc/tc_acc",
            "mc/en_acc",
            "bench/lang_consistency",
            "bench/traditional_purity",
            "tc_bpc",
            "en_bpc",
            "chat_bpc",
            "parallel/information_parity",
            "translation/en2tc_chrf",
            "translation/tc2en_chrf",
        ):
            assert f"sft/{stage}/{key}" in metrics, (stage, key)
        assert (tmp_path / f"eval_{stage}" / "bench").is_dir()
    assert "mc/tc_acc" in metrics and "bench/lang_consistency" in metrics
    assert metrics["sft/after/chat_bpc"] < metrics["sft/before/chat_bpc"]  # the answers got likelier
    assert "val/chat_bpc" in (tmp_path / "csv" / "metrics.csv").read_text()

    # the SFT adapter: a changed copy of the pre-trained one, with the chat template, reproducing chat_bpc
    before = load_file(str(pretrained / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model, tok = load_adapter(tmp_path / "adapter")
    assert tok.chat_template == CHAT_TEMPLATE
    from omegaconf import OmegaConf

    from bailong.data.sft import SFTDataModule, load_chat_splits
    from bailong.eval.bpc import score_windows, scoring_mode

    _, val = load_chat_splits(OmegaConf.to_object(cfg.data), cfg.paths.cache_dir)
    dm = SFTDataModule(tok, [], val, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=0)
    with scoring_mode(model):
        assert score_windows(model, dm.val_batches())["bpc"] == pytest.approx(metrics["sft/after/chat_bpc"], rel=1e-5)


@pytest.mark.slow
def test_sft_from_the_base(tmp_path):
    from bailong.stages import run

    overrides = [
        *SFT_SMOKE,
        "sft.from_base=true",
        "sft.eval_before=false",
        "sft.eval_after=false",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
    ]
    metrics = run(compose_config(overrides, tmp_path))
    assert metrics["sft/source"] == "base" and metrics["train/steps"] == 1
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
