"""bailong.export: the merged model loads with plain transformers and gives the adapter run's logits.

Tolerances, from the arithmetic that differs (weights are the same):
- against the adapter with its 4-bit layers computing in float32: both sides multiply the same
  dequantised NF4 weights (plus W + BA merged once) in float32, so only summation order differs:
  1e-4 absolute/relative on logits of order 1 (measured ~1e-5 on the mini base);
- against the adapter as trained (4-bit layers compute in bfloat16): bfloat16 keeps 8 significant bits,
  a relative error of 2^-9 per rounding of activations and weights, compounded over the layers: the logits
  agree to a few percent of their spread (measured on the SFT'd mini base: max 0.09 with logit std 2.4,
  every argmax equal), so the test bounds the mean error by 1% and the max by 10% of the logits' std.
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.chat import CHAT_TEMPLATE, set_chat_template
from bailong.export import export, inference_chat_template
from bailong.model.adapter import load_adapter, save_adapter
from conftest import trained
from test_build import NF4, NONE, NUM_BASE, VOCAB, batch, make_tiny_base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = make_tiny_base(tmp_path_factory.mktemp("tiny"))
    set_chat_template(t.tokenizer)
    return t


def saved_adapter(tiny, out, quant=NF4, embeddings="new_rows"):
    """An adapter whose every trainable part moved (conftest.trained), saved as a run saves it."""
    save_adapter(trained(tiny, quant, embeddings), tiny.tokenizer, out / "adapter", rows=tiny.rows)
    return out


def set_compute_dtype(model, dtype):
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    run = saved_adapter(tiny, tmp_path_factory.mktemp("run"))
    return run, export(run, tmp_path_factory.mktemp("export") / "merged")


def test_merged_dir_is_plain_transformers(exported):
    run, out = exported
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any("lora" in n or "trainable_tokens" in n for n, _ in model.named_parameters())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == VOCAB
    assert tok.chat_template == inference_chat_template(CHAT_TEMPLATE) and len(tok) == VOCAB
    gen = model.generation_config
    assert (gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (0.6, 0.9, 40, 1.1)
    assert json.loads((out / "bailong_export.json").read_text())["dequantised_from"]["name"] == "nf4"


def test_merged_logits_equal_the_adapter_run(exported):
    run, out = exported
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    adapter, _ = load_adapter(run / "adapter")
    ids = batch(5)
    assert (ids >= NUM_BASE).any()  # the appended (trainable-token) rows are exercised
    with torch.no_grad():
        ours = merged(input_ids=ids).logits
        as_trained = adapter(input_ids=ids).logits
        set_compute_dtype(adapter, torch.float32)
        same_arithmetic = adapter(input_ids=ids).logits
    torch.testing.assert_close(ours, same_arithmetic, atol=1e-4, rtol=1e-4)
    spread = float(ours.std())
    diff = (ours - as_trained).abs()
    assert float(diff.mean()) < 0.01 * spread and float(diff.max()) < 0.10 * spread, (float(diff.max()), spread)


def test_full_precision_lora_embeddings_merge_exactly(tiny, tmp_path):
    """No quantisation, LoRA on the embedding and head too: the merge alone, to float32 precision."""
    run = saved_adapter(tiny, tmp_path / "run", quant=NONE, embeddings="lora")
    out = export(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    adapter, _ = load_adapter(run / "adapter")
    ids = batch(6)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_export_refuses_a_non_empty_directory_and_a_non_run(exported, tmp_path):
    run, out = exported
    with pytest.raises(FileExistsError, match="not empty"):
        export(run, out)
    with pytest.raises(FileNotFoundError, match="not a bailong run or adapter directory"):
        export(tmp_path, tmp_path / "x")


def test_chat_loads_the_exported_model(exported):
    from bailong.chat import load_chat_model, run_prompts

    _, out = exported
    model, tok = load_chat_model(out)
    result = run_prompts(model, tok, ["Hi", "And?"], {"max_new_tokens": 4, "do_sample": False})
    assert [m["role"] for m in result["messages"]] == ["user", "assistant", "user", "assistant"]
