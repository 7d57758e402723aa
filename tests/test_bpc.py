"""Bits per character: equal to a brute-force per-document computation, every token scored once,
the validation loader gives the same number, and the model's mode survives."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents
from bailong.data.pretrain import PretrainDataModule
from bailong.data.windows import collate_windows, scoring_windows, window_spans
from bailong.eval.bpc import bits_per_char, evaluate_texts, score_batch
from test_packing import DATA, build_tiny_tokenizer, tiny_corpora


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


@pytest.mark.parametrize("seq_len", [2, 3, 8, 16])
def test_window_spans_score_every_token_once(seq_len):
    for n_tokens in range(1, 70):
        for stride in range(1, seq_len):
            spans = window_spans(n_tokens, seq_len, stride)
            scored = [p for _, end, first in spans for p in range(first, end)]
            assert scored == list(range(1, n_tokens))  # each document token once, in order; BOS never
            for k, (begin, end, first) in enumerate(spans):
                assert end - begin == min(seq_len, n_tokens)  # every window as full as the text allows
                assert begin < first <= end
                if k > 0:  # context before the first scored token of a later window
                    assert first - begin >= seq_len - stride


def test_window_spans_reject_a_stride_that_skips_tokens():
    with pytest.raises(ValueError, match="stride"):
        window_spans(100, 16, 16)
    with pytest.raises(ValueError, match="seq_len"):
        window_spans(100, 1, 1)


def test_sliding_window_gives_each_token_its_full_context(model, tokenizer):
    """stride 1 means every token is scored with the longest context a window holds (seq_len - 1)."""
    text = load_documents([CorpusConfig(path=str(DATA / "en/kjv.jsonl.gz"), max_docs=1)])[0][:200]
    result = bits_per_char(model, tokenizer, [text], seq_len=16, stride=1, batch_size=16)
    assert result["tokens"] > 40  # several windows
    assert result["bits"] == pytest.approx(brute_force_bits(model, tokenizer, text, context=15), rel=1e-5)
    coarse = bits_per_char(model, tokenizer, [text], seq_len=16, stride=15)  # the cheapest exact cover
    assert (coarse["tokens"], coarse["chars"]) == (result["tokens"], result["chars"])


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
