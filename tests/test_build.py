"""bailong.model.build on a tiny random Llama: 4-bit layers, row writing, trainable sets, the repack guard."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import sentencepiece as spm
import torch
from bitsandbytes.functional import has_avx512bf16
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from bailong.errors import ConfigError
from bailong.model.build import (
    bnb_config,
    build_model,
    count_parameters,
    disable_cpu_repack,
    load_base_model,
    new_rows,
)
from bailong.model.config import LoraConfig, QuantConfig
from conftest import base_config

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS, INTERMEDIATE = 64, 2, 128  # multiples of 32: the bitsandbytes CPU kernel asserts otherwise
NUM_BASE, NUM_NEW = 384, 64
VOCAB = NUM_BASE + NUM_NEW
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = QuantConfig(name="nf4")
NONE = QuantConfig(name="none")


def lora(embeddings: str = "new_rows", r: int = 4, dropout: float = 0.0, **kw) -> LoraConfig:
    return LoraConfig(r=r, alpha=8, dropout=dropout, target_modules=list(TARGETS), embeddings=embeddings, **kw)


def make_tiny_base(root: Path) -> SimpleNamespace:
    """A random tiny Llama saved with save_pretrained, a 384-piece byte-fallback BPE tokenizer trained on
    KJV, that tokenizer extended by 64 Tang-poetry characters, and 64 initial rows for them."""
    with gzip.open(ROOT / "data/en/kjv.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_prefix=str(tok_dir / "tokenizer"),
        vocab_size=NUM_BASE,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(tok_dir))
    with gzip.open(ROOT / "data/zh_tw/poetry_tang.jsonl.gz", "rt") as f:
        poems = [json.loads(line)["text"] for _, line in zip(range(100), f)]
    han = Counter(ch for p in poems for ch in p if "\u4e00" <= ch <= "\u9fff")
    assert tokenizer.add_tokens([ch for ch, _ in han.most_common(NUM_NEW)]) == NUM_NEW

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=NUM_BASE,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    base_dir = root / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)

    # the rows an init strategy would produce on a full-precision copy: base mean plus noise
    full = load_base_model(base_config(str(base_dir)), quant=None)
    mean_in, mean_out = full.get_input_embeddings().weight.mean(0), full.get_output_embeddings().weight.mean(0)
    full.resize_token_embeddings(VOCAB, mean_resizing=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        full.get_input_embeddings().weight[NUM_BASE:] = mean_in + 0.02 * torch.randn(NUM_NEW, HIDDEN, generator=g)
        full.get_output_embeddings().weight[NUM_BASE:] = mean_out + 0.02 * torch.randn(NUM_NEW, HIDDEN, generator=g)
    rows = new_rows(full, NUM_BASE)
    return SimpleNamespace(path=str(base_dir), tokenizer=tokenizer, rows=rows, texts=poems[:4] + docs[:4])


def build(tiny, quant=NF4, embeddings="new_rows", pad_vocab_to_multiple_of=1, **kw):
    return build_model(
        base_config(tiny.path, pad_vocab_to_multiple_of=pad_vocab_to_multiple_of),
        vocab_size=VOCAB,
        num_base=NUM_BASE,
        rows=tiny.rows,
        quant=quant,
        lora=kw.pop("lora", None) or lora(embeddings),
        **kw,
    )


def batch(seed: int = 0) -> torch.Tensor:
    """Token ids that include appended ones, so every trainable part gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 32), generator=g)


def effective_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and head matrices the model computes with, through any peft wrapper."""
    with torch.no_grad():
        embed = model.get_input_embeddings()(torch.arange(VOCAB))
        head = model.get_output_embeddings()(torch.eye(HIDDEN)).T
    return embed, head


def test_new_rows_copies_the_rows_past_num_base(tiny):
    assert tiny.rows["embed"].shape == tiny.rows["head"].shape == (NUM_NEW, HIDDEN)
    full = load_base_model(base_config(tiny.path), quant=None)
    with pytest.raises(ValueError, match="num_base=999"):
        new_rows(full, 999)
    rows = new_rows(full, NUM_BASE - 2)
    assert torch.equal(rows["embed"], full.get_input_embeddings().weight[-2:])
    rows["embed"].zero_()  # a copy, not a view
    assert full.get_input_embeddings().weight[-2:].abs().sum() > 0


def test_bnb_config_is_nf4_double_quant_and_none_means_none():
    cfg = bnb_config(NF4)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and cfg.bnb_4bit_quant_storage == torch.uint8
    assert cfg.llm_int8_skip_modules == ["lm_head"]
    assert bnb_config(NONE) is None and bnb_config(None) is None
    with pytest.raises(ConfigError, match="quant.name='int3'"):
        QuantConfig(name="int3")
    with pytest.raises(ConfigError, match="quant.compute_dtype='fp8'"):
        QuantConfig(name="nf4", compute_dtype="fp8")


def test_nf4_quantises_projections_only_and_writes_rows_by_id(tiny):
    model = build(tiny)
    base = model.get_base_model()
    projections = [m for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
    assert len(projections) == LAYERS * len(TARGETS)
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in projections)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == LAYERS * len(TARGETS)
    embed, head = effective_rows(model)
    assert embed.dtype == head.dtype == torch.float32
    assert torch.equal(embed[NUM_BASE:], tiny.rows["embed"]) and torch.equal(head[NUM_BASE:], tiny.rows["head"])
    full = load_base_model(base_config(tiny.path), quant=None)  # old rows untouched by resizing
    assert torch.equal(embed[:NUM_BASE], full.get_input_embeddings().weight)
    assert torch.equal(head[:NUM_BASE], full.get_output_embeddings().weight)
    assert model.training


def trainable_names(model) -> set[str]:
    """Trainable parameter names with layer numbers dropped, e.g. 'q_proj.lora_A'."""
    names = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = [
                s for s in name.split(".") if s not in ("default", "weight", "base_model", "model") and not s.isdigit()
            ]
            names.add(".".join(parts[-2:]))
    return names


LORA_PROJ = {f"{t}.{ab}" for t in TARGETS for ab in ("lora_A", "lora_B")}


@pytest.mark.parametrize(
    "embeddings, expected",
    [
        ("new_rows", LORA_PROJ | {"token_adapter.trainable_tokens_delta"}),
        ("full", LORA_PROJ | {"embed_tokens.modules_to_save", "lm_head.modules_to_save"}),
        (
            "lora",
            LORA_PROJ
            | {"embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B", "lm_head.lora_A", "lm_head.lora_B"},
        ),
        ("frozen", LORA_PROJ),
    ],
)
def test_only_the_intended_parameters_train(tiny, embeddings, expected):
    model = build(tiny, embeddings=embeddings)
    assert trainable_names(model) == expected


def test_parameter_counts_unpack_4bit_and_match_the_analytic_count(tiny):
    r = 4
    lora_per_layer = r * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + INTERMEDIATE) + (INTERMEDIATE + HIDDEN))
    new_row_params = 2 * NUM_NEW * HIDDEN  # peft's delta rows for embedding and head
    plain = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            intermediate_size=INTERMEDIATE,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    )
    base_total = sum(p.numel() for p in plain.parameters())
    for quant in (NF4, NONE):
        counts = count_parameters(build(tiny, quant=quant))
        assert counts["trainable"] == LAYERS * lora_per_layer + new_row_params
        assert counts["total"] == base_total + counts["trainable"]
        assert counts == count_parameters(build(tiny, quant=quant))  # deterministic


def test_optimizer_step_changes_only_new_rows_and_lora(tiny):
    model = build(tiny, embeddings="new_rows")
    embed0, head0 = effective_rows(model)
    qweight = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.data.clone()
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    embed1, head1 = effective_rows(model)
    assert torch.equal(embed1[:NUM_BASE], embed0[:NUM_BASE]) and torch.equal(head1[:NUM_BASE], head0[:NUM_BASE])
    seen_new = sorted({i for i in ids.flatten().tolist() if i >= NUM_BASE})
    assert seen_new and (embed1[seen_new] != embed0[seen_new]).all(-1).all()
    assert (head1[NUM_BASE:] != head0[NUM_BASE:]).any(-1).all()
    assert torch.equal(model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.data, qweight)


def lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_eval_forward_does_not_change_training_gradients(tiny):
    model = build(tiny)
    assert disable_cpu_repack(model) == LAYERS * len(TARGETS)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave lora_A's gradient zero
            torch.nn.init.normal_(p, std=0.05)
    ids = batch(1)
    before = lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = lora_grads(model, ids)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_unguarded_eval_forward_repacks_and_the_guard_refuses_it(tiny):
    model = load_base_model(base_config(tiny.path), quant=NF4)
    for m in model.modules():  # undo the guard load_base_model applied: what bitsandbytes does by default
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(input_ids=batch() % NUM_BASE)  # the base is not resized
    with pytest.raises(RuntimeError, match="already repacked"):
        disable_cpu_repack(model)


def test_gradient_checkpointing_trains(tiny):
    for quant in (NF4, NONE):
        model = build(tiny, quant=quant, gradient_checkpointing=True)
        base = model.get_base_model()  # the property is transformers >= 5.23's name; older 5.x: is_gradient_*
        assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        grads = lora_grads(model, batch())
        assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora": lambda: lora(r=0)}, "lora.r=0"),
        ({"lora": lambda: lora("partial")}, "lora.embeddings='partial'"),
        ({"lora": lambda: LoraConfig(target_modules=["q_proj", "c_attn"])}, "c_attn"),
        ({"rows": {"embed": torch.zeros(3, HIDDEN), "head": torch.zeros(3, HIDDEN)}}, r"rows\['embed'\] has shape"),
        ({"vocab_size": NUM_BASE - 1}, "old ids never move"),
        ({"num_base": NUM_BASE + 1}, "num_base=385"),
        ({"base": lambda: base_config("/nonexistent", dtype="float64")}, "model.dtype='float64'"),
    ],
)
def test_bad_settings_fail_with_the_key_named(tiny, change, message):
    """Out-of-range settings fail when their config is made (a ConfigError is a ValueError), before any loading;
    settings that only the model can judge (targets, row shapes) fail while building."""
    with pytest.raises(ValueError, match=message):
        settings = {k: v() if callable(v) else v for k, v in change.items()}
        kwargs = {"vocab_size": VOCAB, "num_base": NUM_BASE, "rows": tiny.rows, "quant": NONE, "lora": lora()}
        build_model(settings.pop("base", base_config(tiny.path)), **{**kwargs, **settings})


@pytest.mark.parametrize("group, option", [("quant", "nf4"), ("quant", "none"), ("lora", "default")])
def test_shipped_configs_fit_the_schema_and_build(tiny, group, option):
    from omegaconf import OmegaConf

    from bailong.config import LoraConfig, QuantConfig

    schema = {"quant": QuantConfig, "lora": LoraConfig}[group]
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(ROOT / f"conf/{group}/{option}.yaml"))
    cfg = OmegaConf.to_object(merged)  # as the stages hand it to the library
    settings = {"quant": NF4, "lora": lora(), group: cfg}
    model = build(tiny, quant=settings["quant"], lora=settings["lora"])
    quantised = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert quantised == (settings["quant"].name == "nf4")
