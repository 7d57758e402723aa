"""Configuration errors are caught before any heavy work, each naming the key and the valid range."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bailong.checks as checks
import bailong.pipeline as pipeline
from bailong.checks import ConfigError, bitsandbytes_4bit_on, check_config
from bailong.data.corpus import load_documents
from bailong.tokenization import TokenizerConfigError


@pytest.mark.parametrize("rank", [0, -4])
def test_lora_rank_must_be_positive(make_config, tmp_path, rank):
    with pytest.raises(ConfigError, match=rf"lora\.r={rank}: the LoRA rank must be a positive integer"):
        check_config(make_config([f"lora.r={rank}"], tmp_path))


def test_added_vocab_beyond_the_corpus_fails_before_any_model_loads(make_config, root, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizer's vocabulary was checked")

    monkeypatch.setattr(pipeline, "load_base_model", no_model)
    monkeypatch.setattr(pipeline, "build_model", no_model)
    # a small TC corpus (40 Tang poems), so SentencePiece runs out of merges in a second
    docs = load_documents({"path": str(root / "data/zh_tw/poetry_tang.jsonl.gz"), "max_docs": 40})
    corpus = tmp_path / "tc.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cfg = make_config(["experiment=smoke", f"data.tc=[{{path:{corpus}}}]", "tokenizer.added_vocab=1000000",
                       f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    with pytest.raises(TokenizerConfigError, match=r"tokenizer\.added_vocab=1000000 is larger than .* Valid: 0 .*\.\.\d+"):
        pipeline.run(cfg)


@pytest.mark.parametrize("override,message", [
    ("quant.compute_dtype=float64", r"quant\.compute_dtype='float64': 4-bit layers compute in one of bfloat16"),
    ("quant.quant_type=int4", r"quant\.quant_type='int4': expected nf4 or fp4"),
    ("trainer.accelerator=tpu", r"quant\.name=nf4 with trainer\.accelerator='tpu'.*use quant=none"),
])
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
    monkeypatch.setattr(checks, "_module_names", lambda cfg, config: {
        "model.embed_tokens": "Embedding", "model.layers.0.mixer": "Conv2d", "lm_head": "Linear"})
    with pytest.raises(ConfigError, match=r"quant\.name=nf4: llama model .* has no nn\.Linear layers outside "
                                          r"quant\.skip_modules"):
        check_config(make_config(["lora.target_modules=[mixer]"], tmp_path))


@pytest.fixture
def short_context_base(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
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
