"""Embedding initialisation: each strategy writes exactly what its definition says, old rows stay.

Fixtures: a tiny SentencePiece BPE (Llama layout, byte fallback) trained on real TC+EN text, an
extended copy with appended CJK pieces of three kinds (a character the base lacks, two base
characters, ``▁`` + a lacking character), and a tiny random LlamaForCausalLM. Expected rows are
recomputed here from the definitions, not through the package's helpers.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sentencepiece import SentencePieceTrainer
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from bailong.config import compose_config
from bailong.embedding import (
    EmbeddingInitError,
    InitOptions,
    available_strategies,
    find_new_tokens,
    get_strategy,
    init_options,
    multivariate,
    resize_and_initialize,
)
from bailong.embedding.corpus_pass import shuffled
from bailong.embedding.distill import spell_out
from bailong.embedding.multivariate import sample_rows

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["distill", "mean", "multivariate", "random", "subword_mean", "zip_tie"]
FAST_SHIFT = {"shift_seq_len": 256, "shift_batch_size": 4}
FAST_DISTILL = {"steps": 3, "batch_size": 4, "context_len": 16, "contexts_per_token": 2, **FAST_SHIFT}


def _docs(path: Path, n: int, chars: int) -> list[str]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["text"][:chars])
            if len(out) == n:
                break
    return out


def _is_han(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


@pytest.fixture(scope="module")
def texts():
    tc = _docs(ROOT / "data/zh_tw/poetry_tang.jsonl.gz", 100, 300) + _docs(ROOT / "data/zh_tw/modern.jsonl.gz", 30, 300)
    en = _docs(ROOT / "data/en/fortunes.jsonl.gz", 200, 300)
    return {"tc": tc, "en": en}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, texts):
    """(base, extended, appended pieces) as transformers LlamaTokenizers."""
    buf = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(texts["tc"] + texts["en"]),
        model_writer=buf,
        model_type="bpe",
        vocab_size=1600,
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
        num_threads=1,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    vocab = {p.piece for p in proto.pieces}
    lacking = Counter(c for d in texts["tc"] for c in d if _is_han(c) and c not in vocab)
    pairs = Counter(
        d[i : i + 2]
        for d in texts["tc"]
        for i in range(len(d) - 1)
        if all(_is_han(c) and c in vocab for c in d[i : i + 2]) and d[i : i + 2] not in vocab
    )
    added = [c for c, _ in lacking.most_common(15)] + [p for p, _ in pairs.most_common(15)]
    added += ["▁" + c for c, _ in lacking.most_common(3)]
    base_dir = tmp_path_factory.mktemp("base")
    (base_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    lowest = min(p.score for p in proto.pieces)
    for i, piece in enumerate(added):
        proto.pieces.add(piece=piece, score=lowest - 1 - i, type=model_pb2.ModelProto.SentencePiece.NORMAL)
    ext_dir = tmp_path_factory.mktemp("extended")
    (ext_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    return LlamaTokenizer.from_pretrained(str(base_dir)), LlamaTokenizer.from_pretrained(str(ext_dir)), added


@pytest.fixture(scope="module")
def base_model(tokenizers):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizers[0]),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def expected_spelling(base, piece: str) -> list[int]:
    """Base ids of an appended piece, from how the fixture built it: base characters stay, a
    character the base lacks becomes its UTF-8 bytes, ``▁`` is the base's own ``▁`` piece."""
    vocab = base.get_vocab()
    ids = []
    for c in piece:
        if c in vocab:
            ids.append(vocab[c])
        else:
            ids.extend(vocab[f"<0x{b:02X}>"] for b in c.encode("utf-8"))
    return ids


def spelled_text(base, ids: list[int]) -> str:
    """The piece string that base ids spell, byte pieces joined back into UTF-8."""
    out = b""
    for token in base.convert_ids_to_tokens(ids):
        is_byte = token.startswith("<0x") and token.endswith(">") and len(token) == 6
        out += bytes([int(token[3:5], 16)]) if is_byte else token.encode("utf-8")
    return out.decode("utf-8")


def weights(k: int, rule: str) -> np.ndarray:
    raw = {
        "mean": np.ones(k),
        "first": np.eye(k)[0],
        "last": np.eye(k)[-1],
        "weighted_last": np.arange(1, k + 1, dtype=float),
        "weighted_first": np.arange(k, 0, -1, dtype=float),
    }[rule]
    return raw / raw.sum()


def as_options(cfg) -> InitOptions:
    """A test's init settings as the library takes them: written as a dict (``init_options``), or composed."""
    if isinstance(cfg, dict):
        return init_options(**cfg)
    return cfg if isinstance(cfg, InitOptions) else OmegaConf.to_object(cfg)


def run(base_model, tokenizers, cfg, texts=None, seed=0):
    model = copy.deepcopy(base_model)
    report = resize_and_initialize(model, tokenizers[0], tokenizers[1], as_options(cfg), texts=texts, seed=seed)
    return model, report


def new_rows(model, num_base):
    return (
        model.get_input_embeddings().weight[num_base:].detach().double().numpy(),
        model.get_output_embeddings().weight[num_base:].detach().double().numpy(),
    )


def old_rows(model, num_base):
    return (
        model.get_input_embeddings().weight[:num_base].detach().double().numpy(),
        model.get_output_embeddings().weight[:num_base].detach().double().numpy(),
    )


# ------------------------------------------------------------------------------------------------
# registry, config, tokenizer checks


def test_registry_lists_every_strategy_and_names_them_on_a_bad_name():
    assert available_strategies() == STRATEGIES
    with pytest.raises(EmbeddingInitError, match="zip_tye.*distill, mean, multivariate, random, subword_mean, zip_tie"):
        get_strategy("zip_tye")


def test_bad_config_is_a_clear_error(base_model, tokenizers):
    with pytest.raises(EmbeddingInitError, match="unknown init strategy 'zip_tye'; valid names: distill, mean"):
        run(base_model, tokenizers, {"name": "zip_tye"})
    with pytest.raises(TypeError, match="InitOptions dataclass"):  # the library takes typed options only
        resize_and_initialize(copy.deepcopy(base_model), *tokenizers, {"name": "zip_tie"})
    with pytest.raises(EmbeddingInitError, match=r"\['input_rul'\] are not options of 'zip_tie'; it takes: input_rule"):
        run(base_model, tokenizers, {"name": "zip_tie", "input_rul": "mean"})
    with pytest.raises(EmbeddingInitError, match="output_rule 'middle'"):
        run(base_model, tokenizers, {"name": "zip_tie", "output_rule": "middle"})
    with pytest.raises(EmbeddingInitError, match="pass texts"):
        run(base_model, tokenizers, {"name": "zip_tie", "output_rule": "first_shift"})


def test_keys_of_another_strategy_are_refused(base_model, tokenizers):
    # a mapping is checked against the strategy's own options (Hydra checks the composed config the same way)
    refused = r"\['input_rule', 'steps'\] are not options of 'mean'; it takes: no options"
    with pytest.raises(EmbeddingInitError, match=refused):
        run(base_model, tokenizers, {"name": "mean", "input_rule": "last", "steps": 7})
    with pytest.raises(EmbeddingInitError, match=r"\['steps'\] are not options of 'zip_tie'"):
        run(base_model, tokenizers, {"name": "zip_tie", "steps": 7})  # distill's, though distill extends zip_tie


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_shipped_init_config_runs(name, base_model, tokenizers, texts):
    cfg = compose_config([f"init={name}"]).init  # the strategy's options class, as the `init` group option
    assert cfg.name == name
    cfg = OmegaConf.merge(cfg, FAST_DISTILL if name == "distill" else FAST_SHIFT if name == "zip_tie" else {})
    _, report = run(base_model, tokenizers, cfg, texts=texts["tc"][:20])
    assert report["strategy"] == name


def test_new_tokens_are_spelled_in_base_pieces(tokenizers):
    base, extended, added = tokenizers
    new = find_new_tokens(base, extended)
    assert new.num_base == len(base) and new.ids == list(range(len(base), len(extended)))
    assert new.pieces == added
    assert new.base_pieces == [expected_spelling(base, p) for p in added]
    # the three kinds the fixture appends: bytes of a lacking character, two base characters, ▁ + bytes
    assert [base.convert_ids_to_tokens(i) for i in new.base_pieces[0]][0].startswith("<0xE")
    assert len(new.base_pieces[15]) == 2 and base.convert_ids_to_tokens(new.base_pieces[-1][0]) == "▁"


def test_a_tokenizer_that_moves_base_ids_is_refused(tmp_path, tokenizers, base_model):
    base, extended, _ = tokenizers
    proto = model_pb2.ModelProto()
    proto.ParseFromString((Path(extended.name_or_path) / "tokenizer.model").read_bytes())
    a, b = proto.pieces[300].piece, proto.pieces[301].piece
    proto.pieces[300].piece, proto.pieces[301].piece = b, a
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(EmbeddingInitError, match="moved base id 300"):
        find_new_tokens(base, LlamaTokenizer.from_pretrained(str(tmp_path)))
    with pytest.raises(EmbeddingInitError, match="fewer than the base"):
        find_new_tokens(extended, base)
    smaller = copy.deepcopy(base_model)
    smaller.resize_token_embeddings(len(base) - 1, mean_resizing=False)
    with pytest.raises(EmbeddingInitError, match="embedding rows but the base tokenizer has"):
        resize_and_initialize(smaller, base, extended, init_options("mean"))


def test_the_extension_stage_output_is_accepted(tmp_path, tokenizers, texts):
    extend = pytest.importorskip("bailong.tokenization.extend")
    base, _, _ = tokenizers
    result = extend.extend_tokenizer(Path(base.name_or_path), texts["tc"], 500, tmp_path, character_coverage=0.98)
    extended = extend.load_tokenizer(result.path)
    base_hf = extend.hf_tokenizer_from_proto(extend.load_model_proto(*extend.read_base_model(Path(base.name_or_path))))
    new = find_new_tokens(base_hf, extended)
    assert new.num_new == result.num_added > 0
    for piece, spelled in zip(new.pieces, new.base_pieces):
        assert spelled_text(base, spelled) == piece
        if len(piece) == 1:  # a character the base lacks: its UTF-8 bytes
            assert spelled == expected_spelling(base, piece)


# ------------------------------------------------------------------------------------------------
# every strategy: old rows bit-identical, both matrices written, a JSON-able report


@pytest.mark.parametrize("name", STRATEGIES)
def test_old_rows_stay_and_new_rows_are_written(name, base_model, tokenizers, texts):
    num_base = len(tokenizers[0])
    before = old_rows(base_model, num_base)
    cfg = {"name": name, **(FAST_DISTILL if name == "distill" else FAST_SHIFT if name == "zip_tie" else {})}
    model, report = run(base_model, tokenizers, cfg, texts=texts["tc"][:30])
    after = old_rows(model, num_base)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    embed, head = new_rows(model, num_base)
    assert embed.shape == head.shape == (len(tokenizers[2]), 32)
    assert np.isfinite(embed).all() and np.isfinite(head).all()
    assert not np.allclose(embed, head)  # the head got its own rows, not a copy of the embedding's
    assert model.config.vocab_size == len(tokenizers[1])
    json.dumps(report)
    assert {"strategy", "num_new", "num_base", "options", "row_norms_old", "row_norms_new", "seconds", "info"} <= set(
        report
    )
    assert report["num_new"] == len(tokenizers[2]) and set(report["row_norms_new"]) == {"embed", "head"}
    assert report["row_norms_new"]["embed"]["mean"] == pytest.approx(np.linalg.norm(embed, axis=1).mean(), rel=1e-5)


def test_no_new_tokens_leaves_the_model_as_it_was(base_model, tokenizers):
    model = copy.deepcopy(base_model)
    report = resize_and_initialize(model, tokenizers[0], tokenizers[0], init_options("zip_tie"))
    assert report["num_new"] == 0 and report["info"] == {}
    assert all(torch.equal(v, base_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_tied_model_gets_its_input_rows_only(tokenizers):
    config = LlamaConfig(
        vocab_size=len(tokenizers[0]),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    report = resize_and_initialize(model, tokenizers[0], tokenizers[1], init_options("subword_mean"))
    assert report["tied_embeddings"] and model.get_output_embeddings().weight is model.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------------
# each strategy's definition, recomputed


@pytest.mark.parametrize("std", [None, 0.5])
def test_random_is_normal_with_the_initializer_range(std, base_model, tokenizers):
    num_base, n = len(tokenizers[0]), len(tokenizers[2])
    model, report = run(base_model, tokenizers, {"name": "random", "std": std}, seed=7)
    sigma = std if std is not None else base_model.config.initializer_range
    gen = torch.Generator().manual_seed(7)
    want_embed = torch.normal(0.0, sigma, (n, 32), generator=gen)
    want_head = torch.normal(0.0, sigma, (n, 32), generator=gen)
    embed, head = new_rows(model, num_base)
    assert np.array_equal(embed, want_embed.double().numpy()) and np.array_equal(head, want_head.double().numpy())
    assert report["info"]["std"] == sigma


def test_mean_is_the_mean_of_all_old_rows(base_model, tokenizers):
    num_base = len(tokenizers[0])
    model, _ = run(base_model, tokenizers, {"name": "mean"})
    old_embed, old_head = old_rows(base_model, num_base)
    embed, head = new_rows(model, num_base)
    np.testing.assert_allclose(embed, np.broadcast_to(old_embed.mean(0), embed.shape), atol=1e-7)
    np.testing.assert_allclose(head, np.broadcast_to(old_head.mean(0), head.shape), atol=1e-7)


def test_multivariate_rows_are_the_seeded_gaussian_draw(base_model, tokenizers, monkeypatch):
    """With float32 products (machines without fast bfloat16) the rows are the float64 draw to float32 rounding;
    the bfloat16 path keeps the distribution (next tests), not the values."""
    monkeypatch.setattr(multivariate, "fast_product_dtype", lambda: torch.float32)
    num_base, n = len(tokenizers[0]), len(tokenizers[2])
    model, report = run(base_model, tokenizers, {"name": "multivariate", "covariance_scale": 0.25}, seed=3)
    assert report["info"]["product_dtype"] == "float32"
    gen = torch.Generator().manual_seed(3)
    for old, new in zip(old_rows(base_model, num_base), new_rows(model, num_base)):
        mean = old.mean(0)
        cov = 0.25 * np.cov(old, rowvar=False, bias=True)
        z = torch.randn(n, 32, generator=gen, dtype=torch.float32).double().numpy()
        np.testing.assert_allclose(new, mean + z @ np.linalg.cholesky(cov).T, atol=1e-5)


def test_the_fast_product_dtype_is_one_this_machine_multiplies_fastest():
    dtype = multivariate.fast_product_dtype()
    assert dtype in (torch.float32, torch.bfloat16)
    assert multivariate.fast_product_dtype() is dtype  # measured once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multivariate_samples_have_the_old_rows_mean_and_covariance(base_model, dtype):
    old = base_model.get_input_embeddings().weight.detach()
    draws = sample_rows(old, 1.0, 40_000, torch.Generator().manual_seed(0), dtype).double().numpy()
    want = old.double().numpy()
    np.testing.assert_allclose(draws.mean(0), want.mean(0), atol=4e-4)
    cov, want_cov = np.cov(draws, rowvar=False), np.cov(want, rowvar=False, bias=True)
    assert np.linalg.norm(cov - want_cov) / np.linalg.norm(want_cov) < 0.05


@pytest.mark.parametrize("name", ["random", "multivariate", "distill"])
def test_seeded_strategies_reproduce(name, base_model, tokenizers, texts):
    cfg = {"name": name, **(FAST_DISTILL if name == "distill" else {})}
    if name == "distill":  # from subword_mean: the seed then only drives the sampling of contexts
        cfg["start_from"] = "subword_mean"
    num_base = len(tokenizers[0])
    rows = [new_rows(run(base_model, tokenizers, cfg, texts["tc"][:30], seed=s)[0], num_base) for s in (5, 5, 6)]
    assert all(np.array_equal(a, b) for a, b in zip(rows[0], rows[1]))
    assert not np.array_equal(rows[0][0], rows[2][0])


def test_subword_mean_is_the_mean_of_the_spelling_pieces(base_model, tokenizers):
    base, _, added = tokenizers
    num_base = len(base)
    model, _ = run(base_model, tokenizers, {"name": "subword_mean"})
    old_embed, old_head = old_rows(base_model, num_base)
    embed, head = new_rows(model, num_base)
    for i, piece in enumerate(added):
        spelled = expected_spelling(base, piece)
        np.testing.assert_allclose(embed[i], old_embed[spelled].mean(0), atol=1e-6)
        np.testing.assert_allclose(head[i], old_head[spelled].mean(0), atol=1e-6)


@pytest.mark.parametrize(
    "input_rule,output_rule",
    [
        ("mean", "first"),
        ("first", "last"),
        ("last", "weighted_first"),
        ("weighted_last", "mean"),
        ("weighted_first", "weighted_last"),
    ],
)
def test_zip_tie_piece_rules(input_rule, output_rule, base_model, tokenizers):
    base, _, added = tokenizers
    num_base = len(base)
    model, report = run(
        base_model, tokenizers, {"name": "zip_tie", "input_rule": input_rule, "output_rule": output_rule}
    )
    old_embed, old_head = old_rows(base_model, num_base)
    embed, head = new_rows(model, num_base)
    for i, piece in enumerate(added):
        spelled = expected_spelling(base, piece)
        k = len(spelled)
        np.testing.assert_allclose(embed[i], weights(k, input_rule) @ old_embed[spelled], atol=1e-6)
        np.testing.assert_allclose(head[i], weights(k, output_rule) @ old_head[spelled], atol=1e-6)
    assert report["info"] == {"input_rule": input_rule, "output_rule": output_rule}


def _spelled_chunks(model, tokenizers, texts, seq_len):
    """The extended tokenization of the seeded document order, new tokens spelled in base pieces,
    cut into chunks: per chunk the ids, the extended id starting at each position (-1 inside),
    log-probs and final hidden states of the base."""
    base, extended, _ = tokenizers
    ids, starts = [], []
    for text in shuffled(texts, 0):
        for token in extended(text)["input_ids"]:
            pieces = expected_spelling(base, extended.convert_ids_to_tokens(token)) if token >= len(base) else [token]
            ids += pieces
            starts += [token] + [-1] * (len(pieces) - 1)
    chunks = []
    with torch.no_grad():
        for s in range(0, len(ids), seq_len):
            chunk = torch.tensor([ids[s : s + seq_len]])
            h = model.model(chunk).last_hidden_state[0].double()
            logp = torch.log_softmax(model(chunk).logits[0].double(), -1).numpy()
            chunks.append((ids[s : s + seq_len], starts[s : s + seq_len], logp, h.numpy()))
    return ids, starts, chunks


@pytest.mark.parametrize("estimate,mass_bias", [("occurrence", True), ("prefix", False)])
def test_zip_tie_first_shift_adds_the_continuation_logprob_along_a_constant_direction(
    estimate, mass_bias, base_model, tokenizers, texts
):
    base, _, added = tokenizers
    num_base, seq_len, ridge = len(base), 256, 1e-2
    corpus = texts["tc"][:40]
    cfg = {
        "name": "zip_tie",
        "output_rule": "first_shift",
        "shift_estimate": estimate,
        "shift_ridge": ridge,
        "shift_bias": 0.5,
        "absorbed_mass_bias": mass_bias,
        "shift_seq_len": seq_len,
        "shift_batch_size": 3,
    }
    model, report = run(base_model, tokenizers, cfg, texts=corpus)
    ids, starts, chunks = _spelled_chunks(base_model, tokenizers, corpus, seq_len)

    # the moments are taken where the extended model predicts: before each extended token
    hs = np.concatenate([h[:-1][np.array(st[1:]) >= 0] for _, st, _, h in chunks])
    lps = np.concatenate([lp[:-1][np.array(st[1:]) >= 0] for _, st, lp, _ in chunks])
    firsts = Counter(i for i, st in zip(ids, starts) if st >= 0)
    absorbed_firsts = Counter(i for i, st in zip(ids, starts) if st >= num_base)
    share = np.array([absorbed_firsts[p] / firsts[p] if firsts[p] else 0.0 for p in range(num_base)])
    mass = -np.log1p(-np.clip(np.exp(lps) @ share, 0, 0.99))
    second = hs.T @ hs / len(hs)
    solve = lambda target: np.linalg.solve(second + ridge * np.trace(second) / 32 * np.eye(32), target)  # noqa: E731
    delta, gamma = solve(hs.mean(0)), solve(hs.T @ mass / len(hs))

    def occurrence_mean(t):
        spelled = expected_spelling(base, added[t])
        sums = [
            sum(lp[s + j - 1, spelled[j]] for j in range(1, len(spelled)))
            for row, st, lp, _ in chunks
            for s in range(len(row) - len(spelled) + 1)
            if st[s] == num_base + t
        ]
        return np.mean(sums) if sums else None

    def prefix_sum(t):
        spelled, total = expected_spelling(base, added[t]), 0.0
        for j in range(1, len(spelled)):
            vals = [
                lp[i, spelled[j]]
                for row, _, lp, _ in chunks
                for i in range(j - 1, len(row))
                if row[i - j + 1 : i + 1] == spelled[:j]
            ]
            if not vals:
                return None
            total += np.mean(vals)
        return total

    info = report["info"]
    default_step = info["shift_sources"]["default_step_logprob"]
    _, old_head = old_rows(base_model, num_base)
    _, head = new_rows(model, num_base)
    estimated = 0
    for t, piece in enumerate(added):
        spelled = expected_spelling(base, piece)
        shift = occurrence_mean(t) if estimate == "occurrence" else None
        if shift is None:
            shift = prefix_sum(t)
        if shift is None:  # never seen: (k - 1) times the corpus-wide mean continuation log-prob
            shift = (len(spelled) - 1) * default_step
        else:
            estimated += 1
        want = old_head[spelled[0]] + (shift + 0.5) * delta + (gamma if mass_bias else 0)
        np.testing.assert_allclose(head[t], want, atol=2e-5)
    assert estimated >= 15 and estimated == info["shift_sources"]["occurrence"] + info["shift_sources"]["prefix"]
    assert -20 < default_step < 0
    # how well delta . h = 1 holds decides how exactly a row shift is a logit shift (poorly on a random model)
    assert info["constant_direction_fit_rms"] == pytest.approx(np.sqrt(np.mean((hs @ delta - 1) ** 2)), rel=1e-4)
    assert info["absorbed_mass_bias_mean"] == pytest.approx(mass.mean(), rel=1e-4) and mass.mean() > 0


# ------------------------------------------------------------------------------------------------
# distill


def test_spell_out_aligns_each_new_token_with_its_last_piece(tokenizers, texts):
    base, extended, _ = tokenizers
    new = find_new_tokens(base, extended)
    student = extended(texts["tc"][0])["input_ids"]
    assert any(i >= new.num_base for i in student)
    teacher, ends = spell_out(student, new.num_base, new.base_pieces)
    assert max(teacher) < new.num_base and ends[-1] == len(teacher) - 1
    # every student prefix decodes to the same text as the teacher prefix it is aligned with
    for p in (3, len(student) // 2, len(student) - 1):
        assert extended.decode(student[: p + 1]) == base.decode(teacher[: ends[p] + 1])


def test_distill_with_no_steps_is_its_starting_rule(base_model, tokenizers, texts):
    num_base = len(tokenizers[0])
    start, _ = run(base_model, tokenizers, {"name": "zip_tie", **FAST_SHIFT}, texts=texts["tc"][:30])
    model, report = run(base_model, tokenizers, {"name": "distill", **FAST_DISTILL, "steps": 0}, texts=texts["tc"][:30])
    assert all(np.array_equal(a, b) for a, b in zip(new_rows(start, num_base), new_rows(model, num_base)))
    assert report["info"]["contexts"] > 0


@pytest.mark.parametrize("output_loss", ["none", "match", "ce"])
def test_distill_lowers_its_loss_and_leaves_the_model_frozen(output_loss, base_model, tokenizers, texts):
    num_base = len(tokenizers[0])
    cfg = {
        "name": "distill",
        **FAST_DISTILL,
        "steps": 40,
        "lr": 3e-2,
        "output_loss": output_loss,
        "start_from": "subword_mean",
    }
    model, report = run(base_model, tokenizers, cfg, texts=texts["tc"][:30])
    info = report["info"]
    drop = {"none": 0.2 * info["fixed_batch_loss_before"], "match": 1.0, "ce": 0.1}[output_loss]
    assert info["fixed_batch_loss_after"] < info["fixed_batch_loss_before"] - drop
    body = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    assert all(torch.equal(v, base_model.state_dict()[k]) for k, v in body.items())
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the frozen optimisation
    start, _ = run(base_model, tokenizers, {"name": "subword_mean"})
    embed, head = new_rows(model, num_base)
    assert not np.allclose(embed, new_rows(start, num_base)[0])
    # output rows are learnt only with an output loss
    assert np.array_equal(head, new_rows(start, num_base)[1]) == (output_loss == "none")


# ------------------------------------------------------------------------------------------------
# a byte-level BPE base (models/mini-base-bbpe's tokenizer, Llama 3's layout): new tokens and their merges


def bpe_spelling(merges: list[tuple[str, str]], token: str) -> list[str]:
    """A byte-level token's spelling by ``merges`` (the base's, in rank order): start from its single bytes and
    apply the lowest-ranked merge present until none is, as BPE defines it."""
    rank = {pair: i for i, pair in enumerate(merges)}
    parts = list(token)
    while len(parts) > 1:
        pairs = [(rank.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if (a, b) in rank]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


@pytest.fixture(scope="module")
def bbpe_tokenizers(tmp_path_factory, texts):
    """(base, extended, added tokens): the byte-level mini base's tokenizer and 200 merges appended on TC text."""
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    base_dir = ROOT / "models" / "mini-base-bbpe"
    result = extend_tokenizer(base_dir, texts["tc"], 200, tmp_path_factory.mktemp("bbpe_cache"))
    base, extended = load_tokenizer(base_dir), load_tokenizer(result.path)
    return base, extended, extended.convert_ids_to_tokens(list(range(len(base), len(extended))))


@pytest.fixture(scope="module")
def bbpe_model(bbpe_tokenizers):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(bbpe_tokenizers[0]),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "subword_mean"},
        {"name": "zip_tie", "input_rule": "first", "output_rule": "last"},
        {"name": "zip_tie", "input_rule": "weighted_last", "output_rule": "mean"},
    ],
    ids=["subword_mean", "zip_tie-first-last", "zip_tie-weighted_last-mean"],
)
def test_byte_level_new_rows_follow_their_definitions(cfg, bbpe_model, bbpe_tokenizers):
    """On a byte-level base a new token is spelled by what the base's merges make of its bytes (recomputed here
    from the merge ranks), and each strategy composes those rows as on a SentencePiece base."""
    base, _, added = bbpe_tokenizers
    num_base = len(base)
    spec = json.loads(base.backend_tokenizer.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]]
    vocab = base.get_vocab()
    model, _ = run(bbpe_model, bbpe_tokenizers, cfg)
    old_embed, old_head = old_rows(bbpe_model, num_base)
    embed, head = new_rows(model, num_base)
    several = multi_byte = 0
    for i, token in enumerate(added):
        parts = bpe_spelling(merges, token)
        spelled = [vocab[p] for p in parts]
        several += len(spelled) > 1
        multi_byte += any(len(p) > 1 for p in parts)
        k = len(spelled)
        rules = ("mean", "mean") if cfg["name"] == "subword_mean" else (cfg["input_rule"], cfg["output_rule"])
        np.testing.assert_allclose(embed[i], weights(k, rules[0]) @ old_embed[spelled], atol=1e-6)
        np.testing.assert_allclose(head[i], weights(k, rules[1]) @ old_head[spelled], atol=1e-6)
    assert several == len(added)  # every new token joins at least two base tokens
    assert multi_byte, "no spelling used a base merge: the test would not tell merges from bytes"
