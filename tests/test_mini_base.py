"""The embedded mini base: Llama-2-like tokenizer layout, loadable with Auto*, bit-for-bit rebuilds.

Builds use a tiny variant (hidden 32, 1 layer, 600 pieces, 3 steps) on the first documents of the
repo's corpora; the shipped models/mini-base is checked for layout and card consistency.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.cache import default_cache_dir
from bailong.data.config import CorpusConfig
from bailong.data.corpus import load_documents, split_documents
from bailong.data.prepare import prepare_text
from bailong.model.mini_base import (
    MiniBaseConfig,
    PackedRows,
    build_mini_base,
    byte_level_layout,
    cjk_merges,
    is_han,
    lr_at,
    most_frequent_chars,
    tokenizer_layout,
    train_tokenizer,
)
from bailong.tokenization.byte_level import has_cjk_lead_byte, token_bytes

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "mini-base"
TINY = replace(
    MiniBaseConfig(),
    vocab_size=600,
    han_pieces=40,
    cjk_punct_pieces=4,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=64,
    seq_len=32,
    batch_size=4,
    steps=3,
    warmup_steps=1,
    log_every=1,
    eval_every=2,
)


def _train_docs(path: str, n: int) -> list[str]:
    return split_documents(load_documents([CorpusConfig(path=str(ROOT / path), max_docs=n)]), 0.02, seed=0)[0]


@pytest.fixture(scope="module")
def docs() -> dict[str, list[str]]:
    return {
        "en": _train_docs("data/en/kjv.jsonl.gz", 40) + _train_docs("data/en/fortunes.jsonl.gz", 200),
        "tc": _train_docs("data/zh_tw/poetry_tang.jsonl.gz", 200) + _train_docs("data/zh_tw/modern.jsonl.gz", 20),
    }


@pytest.fixture(scope="module")
def tiny_builds(docs, tmp_path_factory) -> list[Path]:
    dirs = []
    for run in range(2):
        out = tmp_path_factory.mktemp(f"tiny{run}")
        build_mini_base(TINY, docs["en"], docs["tc"], out, log_path=out / "build.log")
        dirs.append(out)
    return dirs


def test_tiny_build_is_bit_for_bit_reproducible(tiny_builds):
    a, b = tiny_builds
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()


def test_another_seed_gives_other_weights(docs, tiny_builds, tmp_path):
    build_mini_base(replace(TINY, seed=1), docs["en"], docs["tc"], tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() != (tiny_builds[0] / "model.safetensors").read_bytes()


def test_tiny_build_loads_with_auto_classes(tiny_builds):
    out = tiny_builds[0]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32  # stored bf16, config says float32
    assert not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (600, 32, 1)
    assert "step 3/3" in (out / "build.log").read_text()


def test_transformers_tokenizer_matches_sentencepiece(tiny_builds, docs):
    out = tiny_builds[0]
    hf = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = docs["en"][:30] + docs["tc"][:30] + ["天地玄黃，宇宙洪荒。", "mixed 中文 and 123 digits"]
    for text in texts:
        if text[:1].isspace():
            continue  # transformers' Metaspace adds no dummy prefix before leading whitespace
        assert hf(text)["input_ids"] == [1, *sp.encode(text)], text[:40]
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text


def tokenizer_files_agree(out: Path, texts: list[str]) -> None:
    """tokenizer.json holds tokenizer.model's vocabulary, and every way of loading the base tokenizes as
    SentencePiece does (AutoTokenizer; the plain tokenizer.json, as bailong's loaders read a hub model)."""
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    loaded = [
        AutoTokenizer.from_pretrained(str(out)),
        PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json")),
    ]
    for text in texts:
        for tok in loaded:
            assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), (type(tok).__name__, text[:40])


def test_a_rebuild_over_another_base_writes_its_own_tokenizer(docs, tmp_path):
    """Building into a directory that holds another base (models/mini-base, rebuilt in place) must not keep that
    base's tokenizer.json: from_pretrained prefers it to the new tokenizer.model, and the model would train on the
    old vocabulary while the extension code reads the new one."""
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    build_mini_base(TINY, docs["en"], docs["tc"], tmp_path, log_path=tmp_path / "build.log")
    tokenizer_files_agree(tmp_path, docs["en"][:5] + docs["tc"][:5])


def test_the_shipped_tokenizer_files_agree():
    texts = ["In the beginning God created the heaven and the earth.\nAnd the earth", "床前明月光，疑是地上霜。\n舉頭"]
    tokenizer_files_agree(SHIPPED, texts)


def test_tokenizer_is_laid_out_as_llama_and_uses_han_pieces(docs):
    sp = spm.SentencePieceProcessor(model_proto=train_tokenizer(docs["en"], docs["tc"], TINY))
    layout = tokenizer_layout(sp)
    assert layout == {"pieces": 600, "byte_pieces": 256, "han_pieces": 40, "cjk_punct_pieces": 4}
    assert sp.get_piece_size() == 600 and sp.id_to_piece(259) != "<0x00>"
    proto = sp_pb2.ModelProto.FromString(sp.serialized_model_proto())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert (spec.byte_fallback, spec.split_digits, norm.name, norm.remove_extra_whitespaces, norm.add_dummy_prefix) == (
        True,
        True,
        "identity",
        False,
        True,
    )
    # the most frequent Han characters are single pieces; a rare one falls back to 3 UTF-8 bytes
    pieces = sp.encode("的不", out_type=str)
    han_in_vocab = [p for p in pieces if p and all(is_han(c) for c in p)]
    assert han_in_vocab, pieces
    rare = sp.encode("鑶", out_type=str)
    assert rare[-3:] == ["<0xE9>", "<0x91>", "<0xB6>"]
    # English words are merged pieces, not characters
    assert len(sp.encode("the")) == 1


def test_too_few_han_characters_is_a_clear_error(docs):
    with pytest.raises(ValueError, match="distinct"):
        train_tokenizer(docs["en"], ["天地"], TINY)


def test_byte_level_tiny_build_is_laid_out_as_llama3(docs, tmp_path):
    """tokenizer="byte_level" (models/mini-base-bbpe): tokenizer.json only, the 256 byte tokens first, English
    merges, then the merges spelling the frequent CJK characters (English splits as the English merges alone
    split it), BOS/EOS after the vocabulary, BOS added by the post-processor and used by the model config."""
    from tokenizers import Tokenizer

    cfg = replace(TINY, tokenizer="byte_level")
    build_mini_base(cfg, docs["en"], docs["tc"], tmp_path, log_path=tmp_path / "build.log")
    assert not (tmp_path / "tokenizer.model").exists()
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    layout = byte_level_layout(Tokenizer.from_file(str(tmp_path / "tokenizer.json")))
    assert (layout["tokens"], layout["byte_tokens"], layout["han_tokens"], layout["cjk_punct_tokens"]) == (
        600,
        256,
        40,
        4,
    )
    assert len(tok) == 600 and (tok.bos_token_id, tok.eos_token_id) == (598, 599)
    assert tok.convert_ids_to_tokens([598, 599]) == ["<|begin_of_text|>", "<|end_of_text|>"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.vocab_size) == (598, 599, 600)
    # English alone: the tokenizer without its CJK merges splits English the same way
    cjk_merges = [m for m in spec["model"]["merges"] if has_cjk_lead_byte("".join(m))]
    assert len(cjk_merges) >= 44  # each character's last merge at least
    english = json.loads(json.dumps(spec))
    english["model"]["merges"] = [m for m in spec["model"]["merges"] if m not in cjk_merges]
    english_only = Tokenizer.from_str(json.dumps(english))
    for text in docs["en"][:50] + ["Call 0912-345-678 before 2025, naïve résumé"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == 598 and ids[1:] == english_only.encode(text, add_special_tokens=False).ids
    frequent = most_frequent_chars(docs["tc"], is_han, 40)
    for char in frequent:
        assert len(tok(char, add_special_tokens=False)["input_ids"]) == 1, char
    rare = "鑶"
    assert len(tok(rare, add_special_tokens=False)["input_ids"]) >= 2
    for text in docs["tc"][:20] + [rare + "\n" + frequent[0]]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_byte_level_merges_spell_each_character_from_its_bytes():
    merges = cjk_merges(["中", "丰"], set())  # E4 B8 AD, E4 B8 B0: the two-byte prefix is shared
    assert [token_bytes(left) + token_bytes(right) for left, right in merges] == [
        b"\xe4\xb8",
        "中".encode(),
        "丰".encode(),
    ]
    with pytest.raises(ValueError, match="tokenizer='wordpiece'"):
        replace(TINY, tokenizer="wordpiece")


def test_packed_rows_cover_the_stream_in_seeded_order():
    docs = [torch.arange(i * 10, i * 10 + 7).numpy() for i in range(5)]
    a = PackedRows(docs, seq_len=4, seed=3).take(6)
    b = PackedRows(docs, seq_len=4, seed=3).take(6)
    assert (a == b).all() and a.shape == (6, 5)
    rows = PackedRows(docs, seq_len=4, seed=3)
    first, second = rows.take(1)[0], rows.take(1)[0]
    assert first[-1] == second[0]  # the last target of a row is the next row's first input
    with pytest.raises(ValueError, match="fewer than one row"):
        PackedRows(docs[:1], seq_len=16, seed=0)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = replace(TINY, steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.01)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def load_builder():
    """experiments/build_mini_base.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("build_mini_base_script", ROOT / "experiments" / "build_mini_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_builder_trains_on_the_prepared_train_split_and_scores_dev_and_test(tmp_path, monkeypatch):
    """The build reads the default data config's prepared split (grouped: Tang poems by title and author,
    near-duplicates at 0.4): it trains on ``train`` only, logs on ``dev``, and its card scores every corpus's ``dev``
    and ``test`` documents."""
    script = load_builder()
    seen = {}
    real = script.build_mini_base

    def spy(cfg, en_docs, tc_docs, out_dir, log_path=None, en_held_out=(), tc_held_out=()):
        seen.update(en=list(en_docs), tc=list(tc_docs), en_dev=list(en_held_out), tc_dev=list(tc_held_out))
        return real(cfg, en_docs, tc_docs, out_dir, log_path, en_held_out, tc_held_out)

    monkeypatch.setattr(script, "build_mini_base", spy)
    out, cache = tmp_path / "mb", tmp_path / "cache"
    script.main(["--tiny", "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--cache-dir", str(cache)])
    data = script.data_config(ROOT, tiny=True)
    assert data.tc[0].group_by == ["title", "author"] and data.dedup.group == 0.4
    assert all(spec.max_docs == script.TINY_MAX_DOCS for spec in data.tc + data.en)
    prepared = prepare_text(data, cache)
    for lang in ("en", "tc"):
        assert seen[lang] == list(prepared.documents(lang, "train"))
        assert seen[f"{lang}_dev"] == list(prepared.documents(lang, "dev"))
        held = set(prepared.documents(lang, "dev")) | set(prepared.documents(lang, "test"))
        assert held and not held & set(seen[lang])
    card = json.loads((out / "card.json").read_text())
    assert set(card["eval"]) == {"dev", "test"} and card["data"]["prepared_text"] == prepared.root.name
    for split in ("dev", "test"):
        for lang in ("en", "tc"):
            for i, spec in enumerate(getattr(data, lang)):
                name = f"{lang}/{Path(spec.path).name.split('.')[0]}"
                docs = list(prepared.documents_by_source(lang, split)[i])
                assert card["eval"][split][name]["docs"] == len(docs) == card["data"]["docs"][name][split] > 0
                assert card["eval"][split][name]["chars"] == sum(map(len, docs))


@pytest.mark.slow  # a subprocess: imports, tokenizer training and evaluation (~12 s idle, ~40 s shared)
def test_build_script_tiny_writes_a_loadable_base_and_card(tmp_path):
    out, logs = tmp_path / "mb", tmp_path / "logs"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "build_mini_base.py"),
            "--tiny",
            "--out",
            str(out),
            "--log-dir",
            str(logs),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    card = json.loads((out / "card.json").read_text())
    assert card["tokenizer"]["han_pieces"] == 40
    for split in ("dev", "test"):
        assert set(card["eval"][split]) >= {"en", "tc", "en/kjv", "tc/poetry_tang"}
        assert card["eval"][split]["tc"]["unigram_bpc"] > 0 and card["eval"][split]["en"]["bpc"] > 0
    readme = (out / "README.md").read_text()
    assert "| **tc** |" in readme and "| mb dev | mb test | unigram dev | unigram test |" in readme
    assert "the `train` split of `conf/data/pretrain_tc.yaml`" in readme
    assert (logs / "main.log").is_file()


def shipped_card() -> dict:
    card = json.loads((SHIPPED / "card.json").read_text())
    assert set(card["eval"]) == {"dev", "test"}, (
        "models/mini-base/card.json predates the grouped three-way split: rebuild the base "
        "(python experiments/build_mini_base.py --out models/mini-base)"
    )
    return card


@pytest.mark.skipif(not (SHIPPED / "card.json").is_file(), reason="models/mini-base not built yet")
def test_shipped_base_matches_its_card():
    card = shipped_card()
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED))
    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    assert sum(p.numel() for p in model.parameters()) == card["architecture"]["parameters"]
    assert (SHIPPED / "model.safetensors").stat().st_size <= 14_000_000
    for size in ("hidden_size", "intermediate_size"):
        assert getattr(model.config, size) % 32 == 0  # the bitsandbytes CPU kernel needs it
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED / "tokenizer.model"))
    assert tokenizer_layout(sp) == card["tokenizer"]
    assert len(tok) == model.config.vocab_size == sp.get_piece_size()
    # what the card promises: Chinese well below a unigram character model, English close to the reference
    test = card["eval"]["test"]
    assert test["tc"]["bpc"] < test["tc"]["unigram_bpc"] - 1.0
    if "reference" in card:
        assert test["en"]["bpc"] < card["reference"]["eval"]["test"]["en"]["bpc"] + 0.25


SHIPPED_BBPE = ROOT / "models" / "mini-base-bbpe"


def test_shipped_byte_level_base_matches_its_card():
    """models/mini-base-bbpe: the card's sizes and tokenizer layout, the same model shape as models/mini-base, and
    what its card promises (Chinese well below the unigram)."""
    from tokenizers import Tokenizer

    card = json.loads((SHIPPED_BBPE / "card.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED_BBPE))
    tok = AutoTokenizer.from_pretrained(str(SHIPPED_BBPE))
    assert not (SHIPPED_BBPE / "tokenizer.model").exists() and card["training"]["tokenizer"] == "byte_level"
    assert sum(p.numel() for p in model.parameters()) == card["architecture"]["parameters"]
    assert byte_level_layout(Tokenizer.from_file(str(SHIPPED_BBPE / "tokenizer.json"))) == card["tokenizer"]
    assert len(tok) == model.config.vocab_size == 5000
    assert (
        (tok.bos_token_id, tok.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id) == (4998, 4999)
    )
    sp_card = json.loads((SHIPPED / "card.json").read_text())
    assert card["architecture"] == sp_card["architecture"]  # the same model; only the tokenizer differs
    test = card["eval"]["test"]
    assert test["tc"]["bpc"] < test["tc"]["unigram_bpc"] - 1.0


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "card.json").is_file(), reason="models/mini-base not built yet")
def test_the_cards_scores_are_the_shipped_weights_scores():
    """Re-scored from the shipped weights on the card's dev and test documents (the default data config prepared
    again: the same prepared text, by its key), every figure of the card's eval table: characters and tokens per
    character exactly, bits per character to the card's 4 decimals (the card rounds)."""
    script = load_builder()
    card = shipped_card()
    data = script.data_config(ROOT, tiny=False)
    prepared = prepare_text(data, default_cache_dir())
    assert prepared.root.name == card["data"]["prepared_text"]
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED))
    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    for split in ("dev", "test"):
        totals: dict[str, list[float]] = {}
        for name, figures in card["eval"][split].items():
            if "/" not in name:
                continue
            lang, stem = name.split("/")
            i = [Path(spec.path).name.split(".")[0] for spec in getattr(data, lang)].index(stem)
            held = list(prepared.documents_by_source(lang, split)[i])
            scored = script.score(model, tok, held)  # the card's own scoring call
            assert (len(held), scored["chars"]) == (figures["docs"], figures["chars"]), (split, name)
            assert round(scored["tokens_per_char"], 4) == figures["tokens_per_char"], (split, name)
            assert abs(scored["bpc"] - figures["bpc"]) <= 5e-5 + 1e-6, (split, name, scored["bpc"], figures["bpc"])
            bits, chars = totals.setdefault(lang, [0.0, 0])
            totals[lang] = [bits + scored["bits"], chars + scored["chars"]]
        for lang, (bits, chars) in totals.items():  # the language rows: the files' bits over their characters
            assert chars == card["eval"][split][lang]["chars"]
            assert abs(bits / chars - card["eval"][split][lang]["bpc"]) <= 5e-5 + 1e-6, (split, lang)
