"""Configuration errors are caught before any heavy work, each naming the key and the valid range."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bailong.checks as checks
import bailong.stages.common as pipeline
from bailong.checks import ConfigError, bitsandbytes_4bit_on, check_config
from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents
from bailong.stages import run as run_stage
from bailong.tokenization import TokenizerConfigError


@pytest.mark.parametrize("rank", [0, -4])
def test_lora_rank_must_be_positive(make_config, tmp_path, rank):
    with pytest.raises(ConfigError, match=rf"lora\.r={rank}: expected a positive integer: the LoRA rank"):
        check_config(make_config([f"lora.r={rank}"], tmp_path))


def test_added_vocab_beyond_the_corpus_fails_before_any_model_loads(make_config, root, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizer's vocabulary was checked")

    monkeypatch.setattr(pipeline, "load_base_model", no_model)
    monkeypatch.setattr(pipeline, "build_model", no_model)
    # a small TC corpus (40 Tang poems), so SentencePiece runs out of merges in a second
    docs = load_documents([CorpusConfig(path=str(root / "data/zh_tw/poetry_tang.jsonl.gz"), max_docs=40)])
    corpus = tmp_path / "tc.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cfg = make_config(
        [
            "experiment=smoke",
            f"data.tc=[{{path:{corpus}}}]",
            "tokenizer.added_vocab=1000000",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        tmp_path / "run",
    )
    with pytest.raises(
        TokenizerConfigError, match=r"tokenizer\.added_vocab=1000000 is larger than .* Valid: 0 .*\.\.\d+"
    ):
        run_stage(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.compute_dtype=float64", r"quant\.compute_dtype='float64': expected one of bfloat16"),
        ("quant.quant_type=int4", r"quant\.quant_type='int4': expected one of nf4, fp4"),
        ("trainer.accelerator=tpu", r"quant\.name=nf4 with trainer\.accelerator='tpu'.*use quant=none"),
    ],
)
def test_unsupported_quantisation_settings(make_config, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_config([override], tmp_path))


def test_four_bit_needs_bitsandbytes_kernels_for_the_device(make_config, tmp_path):
    assert bitsandbytes_4bit_on("CPU")  # this machine's default runs
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer\.accelerator='gpu': no CUDA device is visible"):
            check_config(make_config(["trainer.accelerator=gpu"], tmp_path))
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match=r"trainer\.accelerator='mps': no MPS device is visible"):
            check_config(make_config(["trainer.accelerator=mps"], tmp_path))


def test_four_bit_needs_a_bitsandbytes_backend(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "bitsandbytes_4bit_on", lambda device: False)  # e.g. a build without CPU kernels
    with pytest.raises(ConfigError, match=r"quant\.name=nf4: the installed bitsandbytes has no 4-bit kernels for CPU"):
        check_config(make_config([], tmp_path))
    check_config(make_config(["quant=none"], tmp_path))  # full precision needs none


def test_four_bit_needs_linear_layers_to_quantise(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(
        checks,
        "_module_names",
        lambda cfg, config: {"model.embed_tokens": "Embedding", "model.layers.0.mixer": "Conv2d", "lm_head": "Linear"},
    )
    with pytest.raises(
        ConfigError,
        match=r"quant\.name=nf4: llama model .* has no nn\.Linear layers outside "
        r"quant\.skip_modules",
    ):
        check_config(make_config(["lora.target_modules=[mixer]"], tmp_path))


@pytest.fixture
def short_context_base(tmp_path):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_sequence_length_over_the_models_own_position_limit(make_config, tmp_path, short_context_base):
    # the yaml's model.max_seq_len (1024) allows 128; the model's config.json does not
    cfg = make_config([f"model.pretrained={short_context_base}", "data.seq_len=128"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.seq_len=128 .* max_position_embeddings=64; valid: 2\.\.64"):
        check_config(cfg)
    check_config(make_config([f"model.pretrained={short_context_base}", "data.seq_len=64"], tmp_path))


def test_sequence_length_over_the_configured_limit(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.seq_len=2048 .* model\.max_seq_len=1024"):
        check_config(make_config(["data.seq_len=2048"], tmp_path))


def test_lora_targets_missing_from_the_model(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.target_modules: \['c_attn'\] match no module of llama"):
        check_config(make_config(["lora.target_modules=[q_proj,c_attn]"], tmp_path))


def test_the_default_config_passes(make_config, tmp_path):
    check_config(make_config([], tmp_path))


# -- learning rate and the other optimiser settings --------------------------------------------------------------
@pytest.mark.parametrize("value", ["1e20", "1e38", "1e6", "2", "-0.01", "0", "nan", "inf"])
@pytest.mark.parametrize("key", ["lr", "embedding_lr"])
def test_learning_rates_outside_what_adamw_can_use_are_refused(make_config, tmp_path, key, value):
    shown = str(float(value))  # the message shows the value as the config holds it (1e20 -> 1e+20)
    with pytest.raises(
        ConfigError,
        match=rf"train\.{key}={re.escape(shown)}: expected a finite number in \(0, 1\]: AdamW moves each weight",
    ):
        check_config(make_config([f"train.{key}={value}"], tmp_path))


def test_a_high_learning_rate_is_allowed_with_a_warning(make_config, tmp_path, caplog):
    check_config(make_config(["train.lr=0.05"], tmp_path))
    assert "train.lr=0.05 is above 0.01" in caplog.text
    caplog.clear()
    check_config(make_config(["train.lr=1e-3", "train.embedding_lr=5e-3"], tmp_path))
    assert "is above" not in caplog.text


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.warmup_steps=-1", r"train\.warmup_steps=-1: expected an integer >= 0"),
        ("train.min_lr_ratio=1.5", r"train\.min_lr_ratio=1\.5: expected a number in \[0, 1\]: the cosine floor"),
        ("train.betas=[0.9,1.0]", r"train\.betas=\[0\.9, 1\.0\]: AdamW takes two decay rates, each in \[0, 1\)"),
        ("train.betas=[0.9]", r"train\.betas=\[0\.9\]: AdamW takes two decay rates"),
        ("train.weight_decay=-0.1", r"train\.weight_decay=-0\.1: expected a finite number >= 0"),
        ("train.optimizer=sgd", r"train\.optimizer='sgd': expected one of adamw, adamw_8bit"),
        ("train.checkpoint_every_n_steps=-5", r"train\.checkpoint_every_n_steps=-5: expected an integer >= 0"),
    ],
)
def test_other_training_settings_out_of_range(make_config, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_config([override], tmp_path))


# -- an accelerator this machine lacks, whatever the quantisation ------------------------------------------------
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_a_missing_gpu_is_refused_before_anything_loads(make_config, tmp_path, monkeypatch, quant):
    monkeypatch.setattr(checks, "device_available", lambda device: device == "CPU")  # a machine without a GPU
    with pytest.raises(ConfigError) as err:
        check_config(make_config(["trainer=gpu", f"quant={quant}"], tmp_path))
    assert str(err.value).count("no CUDA device is visible") == 1  # said once, for any quant
    assert "trainer.accelerator='gpu': no CUDA device is visible to torch (use trainer=cpu" in str(err.value)


def test_more_gpus_than_visible_are_refused(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "device_available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    problems = checks.accelerator_problems(make_config(["trainer=ddp", "quant=none"], tmp_path))  # devices: 8
    assert problems == ["trainer.devices=8: only 2 CUDA device(s) are visible to torch; valid: 1..2 (or -1 for all)"]
    assert checks.accelerator_problems(make_config(["trainer=ddp", "trainer.devices=2"], tmp_path)) == []


# -- keys the schema does not have (added with +) ----------------------------------------------------------------
def test_a_key_added_with_plus_that_nothing_reads_is_refused(make_config, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"lora\.rank: lora has no key 'rank'; it was added with \+lora\.rank=\.\.\., "
        r"and nothing reads it .* lora's keys: alpha, dropout, embeddings, r, "
        r"shared_dropout_mask, target_modules",
    ):
        check_config(make_config(["+lora.rank=8"], tmp_path))
    with pytest.raises(ConfigError, match=r"data\.seqlen: data has no key 'seqlen'.*; did you mean data\.seq_len\?"):
        check_config(make_config(["+data.seqlen=64"], tmp_path))
    with pytest.raises(ConfigError, match=r"data\.tc\.0\.foo: data\.tc\.0 has no key 'foo'"):
        check_config(make_config(["+data.tc.0.foo=1"], tmp_path))


def test_a_key_pasted_into_the_config_is_refused_without_echoing_it(make_config, tmp_path):
    planted = "sk-planted-9f8e7d6c5b4a"
    with pytest.raises(ConfigError) as err:
        check_config(make_config([f"+judge.api_key={planted}"], tmp_path))
    message = str(err.value)
    assert "judge.api_key: judge has no key 'api_key'" in message
    assert "export the key in an environment variable (judge.api_key_env names it; default JUDGE_API_KEY)" in message
    assert planted not in message


def test_free_form_nodes_and_trainer_arguments_may_be_added(make_config, tmp_path):
    check_config(
        make_config(
            [
                "+callbacks.kill._target_=bailong.train.callbacks.KillAtStep",
                "+callbacks.kill.step=3",
                "+logger.csv.prefix=run",
                "+trainer.detect_anomaly=true",
                "+trainer.limit_train_batches=2",
            ],
            tmp_path,
        )
    )
    with pytest.raises(ConfigError, match=r"trainer\.detect_anomalies: trainer has no key 'detect_anomalies'"):
        check_config(make_config(["+trainer.detect_anomalies=true"], tmp_path))
