"""Full fine-tuning (``finetune=full``): the config group, the build, the optimizer groups, the fused loss,
save/reload/export, and the whole pipeline on the smoke experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from bailong.checks import ConfigError, check_config
from bailong.model.adapter import META_FILE, load_adapter, save_adapter
from bailong.model.build import build_model, count_parameters, load_base_model
from bailong.model.config import FinetuneConfig
from bailong.train.loss import causal_lm_loss, decoder_and_head, head_weights
from bailong.train.pretrain import _param_groups
from conftest import ROOT, base_config, compose_config
from test_adapter import logits
from test_build import HIDDEN, NF4, NONE, NUM_BASE, NUM_NEW, VOCAB, batch, build


def full(tiny, **kw):
    return build(tiny, quant=NONE, finetune=FinetuneConfig(name="full"), **kw)


def is_4bit(model) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) or any(
        isinstance(p, bnb.nn.Params4bit) for p in model.parameters()
    )


# -- config -------------------------------------------------------------------------------------------
def test_finetune_full_is_one_override_that_turns_quantisation_off(tmp_path):
    default = compose_config([], tmp_path)
    assert default.finetune.name == "lora" and default.quant.name == "nf4"
    cfg = compose_config(["finetune=full"], tmp_path)
    assert cfg.finetune.name == "full" and cfg.quant.name == "none"  # conf/finetune/full.yaml overrides quant
    check_config(cfg)
    check_config(compose_config(["finetune=full", "lora.r=0", "lora.target_modules=[c_attn]"], tmp_path))  # ignored
    assert compose_config(["experiment=bailong_7b", "finetune=full"], tmp_path).quant.name == "none"


def test_full_finetuning_with_nf4_is_refused_naming_both_keys_and_the_fix(tmp_path, tiny):
    cfg = compose_config(["finetune=full", "quant=nf4"], tmp_path)  # the command line wins over the group's default
    assert cfg.quant.name == "nf4"
    with pytest.raises(ConfigError, match=r"finetune\.name=full with quant\.name=nf4: .*use quant=none"):
        check_config(cfg)
    with pytest.raises(ValueError, match=r"finetune\.name=full with quant\.name=nf4"):  # before any loading
        build_model(
            base_config("/nonexistent"),
            vocab_size=VOCAB,
            num_base=NUM_BASE,
            rows=tiny.rows,
            quant=NF4,
            lora=None,
            finetune=FinetuneConfig(name="full"),
        )
    with pytest.raises(ValueError, match=r"finetune\.name='partial'"):
        build_model(
            base_config("/nonexistent"),
            vocab_size=VOCAB,
            num_base=NUM_BASE,
            rows=tiny.rows,
            quant=NONE,
            lora=None,
            finetune=FinetuneConfig(name="partial"),
        )


# -- build ----------------------------------------------------------------------------------------------
def test_full_build_trains_every_weight_of_the_resized_base_without_peft(tiny):
    model = full(tiny)  # lora.* ignored (the stage does not even read it: test_finetune_full_is_one_override...)
    assert not isinstance(model, peft.PeftModel) and not is_4bit(model) and model.training
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    counts = count_parameters(model)
    assert (
        counts["trainable"]
        == counts["total"]
        == sum(p.numel() for p in load_base_model(base_config(tiny.path)).parameters()) + 2 * NUM_NEW * HIDDEN
    )
    base = load_base_model(base_config(tiny.path), quant=None)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape == head.shape == (VOCAB, HIDDEN)
    assert torch.equal(embed[NUM_BASE:], tiny.rows["embed"]) and torch.equal(head[NUM_BASE:], tiny.rows["head"])
    assert torch.equal(embed[:NUM_BASE], base.get_input_embeddings().weight)
    assert torch.equal(head[:NUM_BASE], base.get_output_embeddings().weight)
    assert model.bailong_build["finetune"] == "full" and model.bailong_build["quant"]["name"] == "none"
    assert model.bailong_build["vocab_size"] == VOCAB and model.bailong_build["num_base"] == NUM_BASE
    model = full(tiny, gradient_checkpointing=True)  # is_activation_checkpointing: transformers >= 5.23
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_param_groups_split_embedding_and_head_from_the_rest(tiny):
    """As _full_param_groups' comment says: embedding + head at embedding_lr without decay, decoder matrices at
    lr with the configured decay, norm scales at lr without decay; every parameter in exactly one group."""
    model = full(tiny)
    groups = {g["name"]: g for g in _param_groups(model, lr=1e-4, embedding_lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"embeddings", "decoder", "norms"}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(groups["embeddings"]["params"]) == ids(
        [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    )
    assert (groups["embeddings"]["lr"], groups["embeddings"]["weight_decay"]) == (1e-3, 0.0)
    assert (groups["decoder"]["lr"], groups["decoder"]["weight_decay"]) == (1e-4, 0.1)
    assert (groups["norms"]["lr"], groups["norms"]["weight_decay"]) == (1e-4, 0.0)
    assert all(p.ndim == 2 for p in groups["decoder"]["params"]) and all(p.ndim == 1 for p in groups["norms"]["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in groups["norms"]["params"])
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))
    unset = {g["name"]: g["lr"] for g in _param_groups(model, lr=1e-4, embedding_lr=None, weight_decay=0.0)}
    assert unset == {"embeddings": 1e-4, "decoder": 1e-4, "norms": 1e-4}
    lora_groups = _param_groups(build(tiny, quant=NONE), lr=1e-4, embedding_lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in lora_groups] == ["lora", "embeddings"]  # the LoRA split is unchanged


def test_fused_loss_trains_a_plain_linear_head_exactly(tiny):
    """The fused chunked loss takes a trainable nn.Linear head whole (ids=None) and gives transformers'
    loss and gradients for every parameter."""
    model = full(tiny)
    _, head = decoder_and_head(model)
    weights = head_weights(head)
    assert weights.rows is head.weight and weights.ids is None  # the fused path, whole matrix trainable
    ids = batch(3)
    labels = ids.clone()
    labels[0, :5] = -100
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    chunked = causal_lm_loss(model, ids, labels, logit_budget=3 * VOCAB)  # three tokens per chunk
    chunked.backward()
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        assert expected[name].norm() > 0, name
        relative = float((p.grad - expected[name]).norm() / expected[name].norm())
        assert relative < 1e-5, f"{name}: relative gradient difference {relative:.2e}"


# -- save, reload, export ----------------------------------------------------------------------------------
def trained(tiny, **kw):
    model = full(tiny, **kw)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("pad", [1, 128])  # 128: 448 tokens in 512 rows, the padding logits -inf after reload too
def test_save_writes_a_standalone_model_that_reloads_with_the_same_logits(tiny, tmp_path, pad):
    model = trained(tiny, pad_vocab_to_multiple_of=pad)
    ids = batch(5)
    expected = logits(model, ids)
    save_adapter(model, tiny.tokenizer, tmp_path, rows=tiny.rows, config={"finetune": {"name": "full"}})
    assert {"model.safetensors", "config.json", "tokenizer.json", META_FILE, "config.yaml"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert not (tmp_path / "adapter_config.json").exists()
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["build"]["finetune"] == "full" and meta["build"]["embeddings"] is None

    reloaded, tok = load_adapter(tmp_path)
    assert not isinstance(reloaded, peft.PeftModel) and not reloaded.training and not is_4bit(reloaded)
    assert not any(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)
    assert expected.shape[-1] == -(-VOCAB // pad) * pad and bool(expected[..., VOCAB:].eq(float("-inf")).all())
    assert len(tok) == VOCAB and reloaded.bailong_build["finetune"] == "full"
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # no bailong, no peft needed
    torch.testing.assert_close(logits(plain, ids)[..., :VOCAB], expected[..., :VOCAB], rtol=0, atol=0)

    trainable, _ = load_adapter(tmp_path, is_trainable=True)  # sft.from_run continues training every weight
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert _param_groups(trainable, 1e-4, None, 0.0)[0]["name"] in ("decoder", "embeddings")
    with pytest.raises(ValueError, match="cannot train"):
        load_adapter(tmp_path, quant=NF4, is_trainable=True)


def test_export_of_a_full_run_is_a_copy_in_the_requested_dtype(tiny, tmp_path):
    from bailong.chat import load_chat_model
    from bailong.export import export

    model = trained(tiny)
    save_adapter(model, tiny.tokenizer, tmp_path / "run" / "adapter")
    out = export(tmp_path / "run", tmp_path / "merged", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.dtype == torch.bfloat16
    source = dict(model.named_parameters())
    for name, p in merged.named_parameters():
        assert torch.equal(p, source[name].detach().to(torch.bfloat16)), name
    chat_model, tok = load_chat_model(tmp_path / "run")
    assert not isinstance(chat_model, peft.PeftModel) and len(tok) == VOCAB


# -- the whole pipeline ---------------------------------------------------------------------------------
SMOKE_FULL = ["experiment=smoke", "logger=csv", "finetune=full"]


@pytest.mark.slow
def test_smoke_run_with_full_finetuning_end_to_end(tmp_path):
    """run.py's pipeline with finetune=full: every parameter, old embedding rows included, moves; nothing is
    4-bit; the saved model reproduces the final metrics; ``python -m bailong.eval`` scores it; SFT continues it."""
    from bailong.data.splits import load_splits
    from bailong.eval.bpc import evaluate_texts
    from bailong.stages import run
    from bailong.stages.common import build_tokenizers, initial_rows

    out = tmp_path / "run"
    cfg = compose_config(SMOKE_FULL, output_dir=out)
    metrics = run(cfg)
    assert metrics["train/steps"] == cfg.trainer.max_steps
    assert metrics["params/trainable"] == metrics["params/total"]

    model, tok = load_adapter(out / "adapter")
    assert not is_4bit(model) and not isinstance(model, peft.PeftModel)
    splits = load_splits(OmegaConf.to_object(cfg.data))
    scores = evaluate_texts(model, tok, splits.val(), seq_len=cfg.eval.seq_len, batch_size=cfg.eval.batch_size)
    assert scores["tc_bpc"] == pytest.approx(metrics["final/tc_bpc"], rel=1e-6)  # same logits as trained
    assert scores["en_bpc"] == pytest.approx(metrics["final/en_bpc"], rel=1e-6)

    _, ext, base_tok, _ = build_tokenizers(cfg, splits)
    rows, _ = initial_rows(cfg, base_tok, tok, ext.cache_key, splits)  # cached: the run's own initial rows
    base = dict(load_base_model(base_config(cfg.model.pretrained)).named_parameters())
    num_base = ext.num_base
    for name, p in model.named_parameters():
        before = base[name]
        if p.shape != before.shape:  # embedding and head: old rows vs the base, new rows vs their init
            assert not torch.equal(p[:num_base], before), f"{name}: old rows did not move"
            new = rows["embed" if "embed" in name else "head"]
            assert not torch.equal(p[num_base : num_base + len(new)], new), f"{name}: new rows did not move"
        else:
            assert not torch.equal(p, before), f"{name} did not move"

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY",)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bailong.eval",
            "bpc",
            str(out),
            "--tc",
            str(ROOT / "data/zh_tw/modern.jsonl.gz"),
            "--max-chars",
            "1000",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0 < json.loads(proc.stdout)["final/tc_bpc"] < 20

    sft_out = tmp_path / "sft"
    sft = compose_config(
        [
            "experiment=sft",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.enable_progress_bar=false",
            "train.warmup_steps=1",
            "data.seq_len=128",
            "data.batch_size=4",
            "data.max_val_chars=2000",
            "data.chat.instruct.max_train=50",
            "data.chat.instruct.max_val=4",
            "data.chat.max_val=4",
            "sft.eval_before=false",
            "sft.eval_after=false",
            f"sft.from_run={out}",
        ],
        output_dir=sft_out,
    )
    sft_metrics = run(sft)
    assert sft_metrics["params/trainable"] == sft_metrics["params/total"]
    assert json.loads((sft_out / "adapter" / META_FILE).read_text())["build"]["finetune"] == "full"
