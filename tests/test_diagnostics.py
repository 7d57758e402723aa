"""Per-token diagnostics (bailong/embedding/diagnostics.py) on planted values and a tiny peft model: occurrences
counted, rows' movement measured against peft's own merge, byte-fallback rates and unused pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bailong.embedding.diagnostics import (
    byte_fallback_rate,
    effective_new_rows,
    relative_change,
    row_metrics,
    row_report,
    token_counts,
    tokenizer_report,
)
from conftest import ROOT, trained
from test_build import NONE, NUM_BASE, VOCAB


def test_token_counts_add_every_batch_and_refuse_foreign_ids():
    counts = token_counts([np.array([[0, 1, 1], [4, 4, 4]], dtype=np.uint16), np.array([1, 2])], 6)
    assert counts.tolist() == [1, 3, 1, 0, 3, 0]
    batches = [np.array([[0, 1, 1], [4, 4, 4]], dtype=np.uint16), np.array([1, 2])]
    assert token_counts(batches, 6, chunk_ids=2).tolist() == counts.tolist()  # counted a chunk at a time
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        token_counts([np.array([6])], 6)


def test_rows_report_their_movement_and_buckets():
    initial = {"embed": torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])}
    final = {"embed": torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.5, 0.0], [0.0, 0.0]])}
    assert relative_change(initial["embed"], final["embed"]).tolist() == pytest.approx([0.0, 1.0, 0.5, 1.0])
    report = row_report(["甲", "乙", "丙", "丁"], np.array([0, 3, 50, 200]), initial, final)
    assert report[1] == {"piece": "乙", "count": 3, "embed_change": 1.0}
    m = row_metrics(report)
    assert (m["tokens/new_seen"], m["tokens/new_never_seen"], m["tokens/new_under_trained"]) == (3, 1, 1)
    assert m["tokens/new_occurrences"] == 253
    assert m["tokens/embed_change_median_never"] == 0.0 and m["tokens/embed_change_median_10-99"] == 0.5
    assert m["tokens/embed_change_median_100+"] == 1.0 and "tokens/head_change_median_never" not in m
    with pytest.raises(ValueError, match="same appended tokens"):
        row_report(["甲"], np.array([0, 1]), initial, final)


@pytest.mark.parametrize("embeddings", ["new_rows", "lora", "full", "frozen"])
def test_effective_rows_are_what_peft_merges(tiny, embeddings):
    """The rows the diagnostics read equal the rows of peft's merged model, whatever trains them."""
    model = trained(tiny, NONE, embeddings)
    rows = effective_new_rows(model, NUM_BASE, VOCAB)
    merged = model.merge_and_unload()
    torch.testing.assert_close(rows["embed"], merged.get_input_embeddings().weight[NUM_BASE:VOCAB].float())
    torch.testing.assert_close(rows["head"], merged.get_output_embeddings().weight[NUM_BASE:VOCAB].float())
    moved = relative_change(tiny.rows["embed"], rows["embed"])
    assert (moved == 0).all() if embeddings == "frozen" else (moved > 0).all()


def test_byte_fallback_and_unused_pieces_on_the_mini_base():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "models" / "mini-base"))
    assert byte_fallback_rate(tok, ["the quick brown fox"]) == 0.0
    rare = "𠀀"  # a 4-byte character outside every vocabulary: 4 byte pieces
    ids = tok([rare], add_special_tokens=False)["input_ids"][0]
    assert byte_fallback_rate(tok, [rare]) == pytest.approx(4 / len(ids))
    report = tokenizer_report(tok, tok, len(tok) - 0, {"tc": ["春眠不覺曉"], "en": ["the fox"], "test_tc": []})
    assert set(report) == {f"tokenizer/{lang}_byte_fallback_rate{s}" for lang in ("tc", "en") for s in ("", "_base")}


def test_byte_level_vocabularies_count_the_tokens_that_are_not_whole_characters():
    """A byte-level BPE vocabulary has no ``<0x..>`` pieces: its rate counts tokens whose bytes are not whole UTF-8
    characters, so a character it holds counts 0 and one it does not counts its bytes."""
    import gzip
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with gzip.open(ROOT / "data" / "en" / "kjv.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(500), f)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator(texts + ["春", "眠"] * 1000, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert tok.convert_tokens_to_ids(tok.tokenize("春")) and len(tok.tokenize("春")) == 1  # learned whole
    assert byte_fallback_rate(tok, ["In the beginning God created the heaven"]) == 0.0
    assert byte_fallback_rate(tok, ["春眠"]) == 0.0
    rare = "𠀀"  # 4 bytes no merge joins: 4 partial tokens
    assert len(tok.tokenize(rare)) == 4 and byte_fallback_rate(tok, [rare]) == 1.0
    assert byte_fallback_rate(tok, ["春" + rare]) == pytest.approx(4 / 5)
