"""Bits per character: equal to a brute-force per-document computation, every token scored once,
the validation loader gives the same number, and the model's mode survives."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents
from bailong.data.pretrain import PretrainDataModule
from bailong.data.windows import collate_windows, scoring_windows, window_spans
from bailong.eval.bpc import bits_per_char, evaluate_texts, score_batch
from test_packing import DATA, build_tiny_tokenizer, tiny_corpora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_model(vocab_size: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.3,  # peaked, not near-uniform, predictions: an off-by-one shift cannot hide
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def short_texts():
    """Held-out documents (beyond the tokenizer's training slice), short enough for one window."""

    def held_out(path: str) -> list[str]:
        return load_documents([CorpusConfig(path=str(DATA / path), max_docs=212)])[200:]

    tc = [d[:60] for d in held_out("zh_tw/poetry_tang.jsonl.gz")]
    en = [d[:150] for d in held_out("en/fortunes.jsonl.gz")]
    return tc + en


def brute_force_bits(model, tokenizer, text: str, context: int | None = None) -> float:
    """-log2 p of each document token given ``BOS + doc[:t]`` (the last ``context`` tokens of it), one
    unpadded forward pass per document (or per token when ``context`` is set)."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        if context is None:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            return -sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids))) / math.log(2)
        bits = 0.0
        for t in range(1, len(ids)):
            window = ids[max(0, t - context) : t]  # the context; its last logit predicts ids[t]
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0, -1].double(), -1)
            bits -= logp[ids[t]].item() / math.log(2)
        return bits


def test_bits_per_char_equals_brute_force(model, tokenizer, short_texts):
    result = bits_per_char(model, tokenizer, short_texts, seq_len=256, batch_size=5)  # padded batches
    bits = sum(brute_force_bits(model, tokenizer, t) for t in short_texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in short_texts)
    chars = sum(len(t) for t in short_texts)
    assert result["bits"] == pytest.approx(bits, rel=1e-5)
    assert result["chars"] == chars and result["tokens"] == tokens
    assert result["bytes"] == sum(len(t.encode("utf-8")) for t in short_texts)
    assert result["bpc"] == pytest.approx(bits / chars, rel=1e-5)
    assert result["bpb"] == pytest.approx(bits / result["bytes"], rel=1e-5)
    assert result["tokens_per_char"] == pytest.approx(tokens / chars)


@pytest.mark.parametrize("budget", [8, 9, 13, 40])
def test_window_spans_score_every_character_once_within_the_byte_budget(budget):
    rng = random.Random(budget)
    for n in range(1, 80):
        char_bytes = [rng.choice([1, 1, 3, 4]) for _ in range(n)]
        spans = window_spans(char_bytes, budget)
        scored = [c for _, end, first in spans for c in range(first, end)]
        assert scored == list(range(n))  # each character once, in order
        if sum(char_bytes) <= budget:
            assert spans == [(0, n, 0)]  # a document that fits is one window, whole
        for k, (begin, end, first) in enumerate(spans):
            assert begin <= first < end and sum(char_bytes[begin:end]) <= budget
            if k > 0:  # a later window keeps the characters before it as context: half the budget, less one char
                assert sum(char_bytes[begin:first]) > budget // 2 - 4
        begin, end, _ = spans[-1]
        assert end == n and (begin == 0 or sum(char_bytes[begin - 1 :]) > budget)  # end-aligned, full


def test_window_spans_reject_a_budget_without_room_for_context():
    with pytest.raises(ValueError, match="byte_budget"):
        window_spans([1] * 100, 7)
    with pytest.raises(ValueError, match="seq_len must be at least 10"):
        scoring_windows(None, ["x"], seq_len=9)


def windowed_brute_force_bits(model, tokenizer, text: str, windows) -> float:
    """-log2 p of each token given the tokens that start in its window's characters (BOS first when the window
    starts the document), one unpadded forward pass per token: the character windows re-derived from offsets."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = enc["input_ids"], [min(s, len(text) - 1) for s, _ in enc["offset_mapping"]]
    bits = 0.0
    with torch.no_grad():
        for t, (token, start) in enumerate(zip(ids, starts)):
            begin, first, end = next(w.char_span for w in windows if w.char_span[1] <= start < w.char_span[2])
            context = [i for i, s in zip(ids[:t], starts[:t]) if s >= begin] or ids[t - 1 : t]
            context = [tokenizer.bos_token_id, *context] if begin == 0 else context
            logp = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].double(), -1)
            bits -= logp[token].item() / math.log(2)
    return bits


@pytest.mark.parametrize("path", ["en/kjv.jsonl.gz", "zh_tw/modern.jsonl.gz"])
def test_long_documents_are_scored_in_character_windows_with_their_context(model, tokenizer, path):
    text = load_documents([CorpusConfig(path=str(DATA / path), max_docs=1)])[0][:300]
    windows = scoring_windows(tokenizer, [text], seq_len=40)
    assert len(windows) > 4 and all(len(w.input_ids) <= 40 for w in windows)
    result = bits_per_char(model, tokenizer, [text], seq_len=40, batch_size=16)
    assert result["tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert result["bits"] == pytest.approx(windowed_brute_force_bits(model, tokenizer, text, windows), rel=1e-5)


def test_two_tokenizers_see_the_same_character_windows(tokenizer):
    """The fairness the windows exist for: the base's and an extended tokenizer (fewer tokens per character)
    score each character with the same characters of context."""
    from transformers import AutoTokenizer

    mini = AutoTokenizer.from_pretrained(str(ROOT / "models" / "mini-base"))
    docs = [
        load_documents([CorpusConfig(path=str(DATA / p), max_docs=1)])[0][:900]
        for p in ("zh_tw/modern.jsonl.gz", "en/kjv.jsonl.gz")
    ]
    spans = {}
    for name, tok in (("tiny", tokenizer), ("mini", mini)):
        windows = scoring_windows(tok, docs, seq_len=128)
        assert all(len(w.input_ids) <= 128 for w in windows)
        spans[name] = sorted(w.char_span for w in windows)
    assert len(spans["tiny"]) > 6 and spans["tiny"] == spans["mini"]


def test_a_tokenizer_with_more_tokens_than_bytes_is_refused():
    class TwoTokensPerCharacter:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, texts, **kwargs):
            return {
                "input_ids": [[5, 6] * len(t) for t in texts],
                "offset_mapping": [[(i, i + 1) for i in range(len(t)) for _ in range(2)] for t in texts],
            }

    assert len(scoring_windows(TwoTokensPerCharacter(), ["a" * 7], seq_len=16)[0].input_ids) == 15
    with pytest.raises(ValueError, match="more tokens than bytes; lower eval.seq_len"):
        scoring_windows(TwoTokensPerCharacter(), ["a" * 14], seq_len=16)


def test_documents_that_fit_the_model_positions_are_scored_whole_by_default(model, tokenizer):
    text = load_documents([CorpusConfig(path=str(DATA / "en/kjv.jsonl.gz"), max_docs=1)])[0][:400]
    assert model.config.max_position_embeddings - 2 >= len(text.encode())  # fits the tiny model's positions
    result = bits_per_char(model, tokenizer, [text])  # seq_len: the model's max_position_embeddings
    assert result["bits"] == pytest.approx(brute_force_bits(model, tokenizer, text), rel=1e-5)
    assert bits_per_char(model, tokenizer, [text], seq_len=64)["bits"] != pytest.approx(result["bits"], rel=1e-4)


def test_uniform_logits_give_log2_vocab_bits_per_token(tokenizer, short_texts):
    model = tiny_model(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = bits_per_char(model, tokenizer, short_texts, seq_len=64, batch_size=4)
    assert result["bpc"] == pytest.approx(math.log2(len(tokenizer)) * result["tokens"] / result["chars"], rel=1e-6)


def test_model_mode_is_restored_and_scoring_is_eval_without_grad(tokenizer, short_texts):
    model = tiny_model(len(tokenizer), attention_dropout=0.5)  # in train mode, dropout would change the bits
    model.train()
    model.model.layers[1].eval()  # a module deliberately in eval mode stays so
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), m.training)))
    result = bits_per_char(model, tokenizer, short_texts[:4], seq_len=256)
    assert seen and set(seen) == {(False, False)}
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    expected = sum(brute_force_bits(model, tokenizer, t) for t in short_texts[:4])
    assert result["bits"] == pytest.approx(expected, rel=1e-5)


def test_peft_model_is_scored_through_its_adapter(model, tokenizer, short_texts):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.train()
    texts = short_texts[:6]
    result = bits_per_char(peft_model, tokenizer, texts, seq_len=256, batch_size=4)
    assert peft_model.training and peft_model.base_model.model.model.layers[0].self_attn.q_proj.training
    peft_model.eval()
    assert result["bits"] == pytest.approx(sum(brute_force_bits(peft_model, tokenizer, t) for t in texts), rel=1e-5)
    assert result["bits"] != pytest.approx(bits_per_char(model, tokenizer, texts, seq_len=256)["bits"], rel=1e-3)


def test_chunked_logits_give_the_same_bits(model, tokenizer, short_texts):
    batch = collate_windows(scoring_windows(tokenizer, short_texts, seq_len=64))
    with torch.no_grad():
        whole = score_batch(model, batch)
        one_row_at_a_time = score_batch(model, batch, logit_budget=1)
    assert torch.allclose(whole, one_row_at_a_time, rtol=1e-6)


def test_evaluate_texts_prefixes_each_text_set(model, tokenizer, short_texts):
    metrics = evaluate_texts(model, tokenizer, {"tc": short_texts[:3], "en": short_texts[-3:]}, seq_len=64)
    for name in ("tc", "en"):
        keys = ("bpc", "bpb", "bits", "chars", "bytes", "tokens", "tokens_per_char")
        assert {f"{name}_{k}" for k in keys} <= set(metrics)
    assert metrics["tc_bpc"] == pytest.approx(bits_per_char(model, tokenizer, short_texts[:3], seq_len=64)["bpc"])


def test_bad_evaluation_input_is_named(model, tokenizer):
    with pytest.raises(TypeError, match="list of documents"):
        bits_per_char(model, tokenizer, "one string", seq_len=64)
    with pytest.raises(ValueError, match="empty"):
        bits_per_char(model, tokenizer, [], seq_len=64)


def test_validation_loaders_give_bits_per_char_of_the_val_texts(model, tokenizer):
    tc, en = tiny_corpora()  # includes long documents: sliding windows in both paths
    dm = PretrainDataModule(
        tokenizer,
        tc[:-15],
        en[:-15],
        tc[-15:],
        en[-15:],
        seq_len=32,
        batch_size=4,
        tc_ratio=0.8,
        seed=0,
        max_val_chars=2500,
    )
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert len(loaders) == 2 and dm.val_names == ("tc", "en")
    model.train()
    for name, loader in zip(dm.val_names, loaders):
        bits, chars = 0.0, 0
        with torch.no_grad():
            model.eval()
            for batch in loader:
                bits += float(score_batch(model, batch).sum())
                chars += int(batch["chars"].sum())
        expected = bits_per_char(model, tokenizer, dm.val_texts[name], seq_len=32, batch_size=4)
        assert chars == dm.val_chars[name] == expected["chars"] <= 2500 + max(map(len, dm.val_texts[name]))
        assert bits / chars == pytest.approx(expected["bpc"], rel=1e-9)
        assert any(w.n_chars == 0 for w in dm._val_windows[name])  # some documents span several windows
