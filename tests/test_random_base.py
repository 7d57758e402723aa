"""The random real-width base (bailong/model/random_base.py): Llama-2-7B's exact config and tokenizer layout,
seeded bytes, safe under concurrent callers, and the configs that use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from bailong.model import random_base
from bailong.model.config import ModelConfig, RandomBaseConfig
from bailong.model.mini_base import tokenizer_layout
from bailong.model.random_base import ensure_random_base
from conftest import ROOT, compose_config

# config.json of meta-llama/Llama-2-7b-hf (transformers 4.31), every key that shapes the model or its tokens
LLAMA2_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "attention_bias": False,
    "mlp_bias": False,
}
# a Llama small enough to build in a blink, for the tests of seeding and locking (tests only)
TINY = (
    "llama",
    "llama2",
    dict(
        random_base.LLAMA2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
)


def cfg(path: Path, architecture: str = "tiny", num_layers: int = 2, seed: int = 0) -> ModelConfig:
    spec = RandomBaseConfig(architecture=architecture, num_layers=num_layers, seed=seed)
    return ModelConfig(name=Path(path).name, pretrained=str(path), random_base=spec)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(random_base.ARCHITECTURES, "tiny", TINY)


@pytest.fixture(scope="module")
def llama2_7b_one_layer(tmp_path_factory) -> Path:
    """One decoder layer at Llama-2-7B's real widths: ~0.46B parameters, ~0.9 GB, seconds to build."""
    return ensure_random_base(cfg(tmp_path_factory.mktemp("rb") / "llama2_7b-L1", "llama2_7b", num_layers=1))


def test_config_is_llama2_7b_but_for_depth(llama2_7b_one_layer):
    written = json.loads((llama2_7b_one_layer / "config.json").read_text())
    assert {k: written.get(k) for k in LLAMA2_7B} == {**LLAMA2_7B, "num_hidden_layers": 1}
    assert written["rope_parameters"]["rope_theta"] == 10000.0 and written["dtype"] == "bfloat16"
    loaded = AutoConfig.from_pretrained(llama2_7b_one_layer)  # transformers reads it back the same
    assert (loaded.hidden_size, loaded.intermediate_size, loaded.num_hidden_layers) == (4096, 11008, 1)


def test_weights_are_bf16_initialised_as_transformers_does(llama2_7b_one_layer):
    with safe_open(str(llama2_7b_one_layer / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        proj = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        head = f.get_slice("lm_head.weight")[:1000]
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (32000, 4096)  # untied
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (11008, 4096)
    assert len(shapes) == 2 + 9 + 1  # embedding, head, 7 projections + 2 norms, final norm
    assert norm.dtype == proj.dtype == torch.bfloat16 and bool((norm == 1).all())
    for w in (proj, head):
        assert abs(w.float().mean().item()) < 1e-3 and w.float().std().item() == pytest.approx(0.02, rel=0.01)
    manifest = json.loads((llama2_7b_one_layer / "random_base.json").read_text())
    assert manifest["parameters"] == 2 * 32000 * 4096 + 4 * 4096**2 + 3 * 4096 * 11008 + 3 * 4096


def test_tokenizer_has_the_llama2_layout(llama2_7b_one_layer):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_7b_one_layer / "tokenizer.model"))
    layout = tokenizer_layout(sp)  # raises unless ids 0-2 are <unk> <s> </s> and 3-258 the 256 bytes
    assert layout["pieces"] == 32000 and layout["byte_pieces"] == 256
    tok = AutoTokenizer.from_pretrained(llama2_7b_one_layer)
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok("Hello 臺灣")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "Hello 臺灣"


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    a = ensure_random_base(cfg(tmp_path / "a"))
    b = ensure_random_base(cfg(tmp_path / "b"))
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    c = ensure_random_base(cfg(tmp_path / "c", seed=1))
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    # every tensor has its own generator: a deeper model starts with the shallower one's layers
    deeper = ensure_random_base(cfg(tmp_path / "d", num_layers=3))
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(deeper / "model.safetensors"), "pt") as fd:
        for name in fa.keys():
            assert torch.equal(fa.get_tensor(name), fd.get_tensor(name)), name
        assert "model.layers.2.self_attn.q_proj.weight" in set(fd.keys())


def test_sharded_past_the_shard_size(tiny, tmp_path, monkeypatch):
    whole = ensure_random_base(cfg(tmp_path / "whole"))
    monkeypatch.setattr(random_base, "SHARD_BYTES", 200_000)  # the tiny model is ~0.9 MB in bf16
    sharded = ensure_random_base(cfg(tmp_path / "sharded"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    m1, m2 = (AutoModelForCausalLM.from_pretrained(p) for p in (whole, sharded))
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_no_random_base_is_a_no_op(tmp_path):
    target = tmp_path / "somewhere"
    assert ensure_random_base(ModelConfig(name="somewhere", pretrained=str(target))) == target
    assert not target.exists()


def test_a_directory_built_for_another_spec_is_refused(tiny, tmp_path):
    ensure_random_base(cfg(tmp_path / "base", seed=0))
    with pytest.raises(FileExistsError, match="seed"):
        ensure_random_base(cfg(tmp_path / "base", seed=7))
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not written by ensure_random_base"):
        ensure_random_base(cfg(tmp_path / "real"))
    with pytest.raises(ValueError, match="architecture"):
        ensure_random_base(cfg(tmp_path / "x", architecture="llama9"))


def test_concurrent_callers_build_once(tiny, tmp_path, monkeypatch):
    """Threads hold separate lock file descriptors, so they exclude each other as processes do."""
    builds = []
    write = random_base.write_random_base
    monkeypatch.setattr(random_base, "write_random_base", lambda *a, **k: (builds.append(1), write(*a, **k)))
    target, start, errors = tmp_path / "shared", threading.Barrier(4), []

    def call():
        start.wait()
        try:
            ensure_random_base(cfg(target))
        except Exception as err:  # noqa: BLE001  surfaced below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "shared.lock"]  # no temporary left


@pytest.mark.slow  # three interpreters importing torch and transformers at once (~30 s on a shared CPU)
def test_concurrent_processes_agree(tmp_path):
    script = (
        "import sys; from bailong.model import random_base as rb; import tests.test_random_base as t; "
        "rb.ARCHITECTURES['tiny'] = t.TINY; print(rb.ensure_random_base(t.cfg(sys.argv[1])))"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "shared")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    reference = tmp_path / "reference"
    random_base.ARCHITECTURES["tiny"] = TINY
    try:
        ensure_random_base(cfg(reference))
    finally:
        del random_base.ARCHITECTURES["tiny"]
    for f in reference.iterdir():
        assert (tmp_path / "shared" / f.name).read_bytes() == f.read_bytes(), f.name


def test_widths_configs_compose(tmp_path):
    c = compose_config(["experiment=llama2_7b_widths", f"paths.cache_dir={tmp_path}"], tmp_path)
    assert c.model.name == "llama2_7b_widths" and c.model.dtype == "bfloat16" and c.model.max_seq_len == 4096
    assert c.model.random_base == {"architecture": "llama2_7b", "num_layers": 2, "seed": 0}
    assert c.model.pretrained == f"{tmp_path}/random_bases/llama2_7b-L2-seed0"
    assert 32000 + c.tokenizer.added_vocab == 59241
    assert c.quant.name == "nf4" and c.lora.r == 64 and c.lora.alpha == 16
    assert list(c.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert c.data.seq_len >= 512 and c.trainer.max_steps == 2 and list(c.logger) == ["csv"]
    assert c.init.name == "zip_tie" and c.init.shift_max_tokens <= 10_000
    m = compose_config(["model=llama2_7b_widths", "model.random_base.num_layers=32", f"paths.cache_dir={tmp_path}"])
    assert m.model.pretrained.endswith("llama2_7b-L32-seed0")
    assert not Path(c.model.pretrained).exists()  # composing builds nothing
