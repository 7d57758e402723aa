"""bailong.model.adapter: an adapter dir reloads onto a fresh base and gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from bailong.model.adapter import CONFIG_FILE, META_FILE, ROWS_FILE, load_adapter, save_adapter
from conftest import trained
from test_build import HIDDEN, NF4, NONE, NUM_BASE, NUM_NEW, VOCAB, batch, build


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "quant, embeddings",
    [
        (NONE, "new_rows"),
        (NF4, "new_rows"),
        (NONE, "lora"),
        (NF4, "lora"),
        (NF4, "full"),
        (NF4, "frozen"),
    ],
)
def test_reload_onto_a_fresh_base_gives_the_same_logits(tiny, tmp_path, quant, embeddings):
    model = trained(tiny, quant, embeddings)
    ids = batch(5)
    expected = logits(model, ids)
    save_adapter(model, tiny.tokenizer, tmp_path, rows=tiny.rows, config={"lora": {"embeddings": embeddings}})

    torch.manual_seed(99)  # the fresh base's resized rows get other random values
    reloaded, tokenizer = load_adapter(tmp_path)
    assert not reloaded.training
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-6)  # measured: 0.0
    assert torch.equal(logits(reloaded, ids), logits(reloaded, ids))  # eval forward kept the weights as they were
    assert len(tokenizer) == len(tiny.tokenizer) == VOCAB
    for text in tiny.texts:
        assert tokenizer(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]


def adapter_keys(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("embeddings", ["new_rows", "lora", "full", "frozen"])
def test_each_value_is_stored_once(tiny, tmp_path, embeddings):
    save_adapter(build(tiny, embeddings=embeddings), tiny.tokenizer, tmp_path, rows=tiny.rows)
    full_matrices = [k for k, shape in adapter_keys(tmp_path).items() if shape == (VOCAB, HIDDEN)]
    row_blocks = [k for k, shape in adapter_keys(tmp_path).items() if shape == (NUM_NEW, HIDDEN)]
    meta = json.loads((tmp_path / META_FILE).read_text())
    if embeddings == "new_rows":  # peft stores the trained rows; no whole matrix, no rows file
        assert len(row_blocks) == 2 and not full_matrices and not (tmp_path / ROWS_FILE).exists()
    elif embeddings == "full":  # peft stores both whole matrices, which hold the new rows
        assert len(full_matrices) == 2 and not (tmp_path / ROWS_FILE).exists()
    else:  # peft stores no embedding values: the frozen initial rows go to the rows file
        assert not full_matrices and not row_blocks and meta["files"] == {"rows": ROWS_FILE}
        with safe_open(str(tmp_path / ROWS_FILE), "pt") as f:
            assert torch.equal(f.get_tensor("embed"), tiny.rows["embed"])
            assert torch.equal(f.get_tensor("head"), tiny.rows["head"])
    assert meta["build"]["num_base"] == NUM_BASE and meta["build"]["vocab_size"] == VOCAB
    assert meta["build"]["embeddings"] == embeddings and meta["build"]["quant"]["name"] == "nf4"


def test_config_is_written_as_yaml(tiny, tmp_path):
    config = {"init": {"name": "zip_tie"}, "lora": {"r": 4, "target_modules": ["q_proj"]}, "seed": 1234}
    save_adapter(build(tiny, quant=NONE, embeddings="frozen"), tiny.tokenizer, tmp_path, rows=tiny.rows, config=config)
    assert yaml.safe_load((tmp_path / CONFIG_FILE).read_text()) == config


def test_reload_without_quantisation_of_an_nf4_adapter(tiny, tmp_path):
    """An adapter trained on the 4-bit base, reloaded onto the full-precision base, is that adapter on that base:
    the logits of a full-precision build given the trained adapter's parameters by name (measured: 0.0)."""
    model = trained(tiny, NF4, "new_rows")
    save_adapter(model, tiny.tokenizer, tmp_path, rows=tiny.rows)
    reloaded, _ = load_adapter(tmp_path, quant=NONE)
    assert not any("Linear4bit" in type(m).__name__ for m in reloaded.modules())
    reference = build(tiny, quant=NONE, embeddings="new_rows")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.requires_grad:
                p.copy_(trainable.pop(name))
    assert not trainable  # every trained parameter found its place
    ids = batch(5)
    torch.testing.assert_close(logits(reloaded, ids), logits(reference, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-3)  # not the 4-bit model's


def test_bad_inputs_fail_clearly(tiny, tmp_path):
    model = build(tiny, quant=NONE, embeddings="lora")
    wrong = {"embed": tiny.rows["embed"] + 1, "head": tiny.rows["head"]}
    with pytest.raises(ValueError, match=r"rows\['embed'\] differs"):
        save_adapter(model, tiny.tokenizer, tmp_path / "a", rows=wrong)
    with pytest.raises(ValueError, match="bailong_build"):
        save_adapter(model.get_base_model(), tiny.tokenizer, tmp_path / "b", rows=tiny.rows)
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_adapter(tmp_path / "nothing")
