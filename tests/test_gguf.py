"""GGUF export (bailong/gguf.py) read by llama.cpp itself, through llama-cpp-python (the ``gguf`` extra).

The model is a real ``experiment=smoke`` run on the mini base (extended SentencePiece tokenizer, NF4, LoRA),
exported and converted by llama.cpp's own ``convert_hf_to_gguf.py``. What is checked, on held-out text (the
parallel set's test pairs, which share no 24 characters with the training text):
- llama.cpp's tokenizer gives exactly the extended tokenizer's ids, Traditional Chinese and English;
- f16 logits match the exported float32 model: f16 keeps 11 significant bits (relative error 2^-11 per weight),
  so after the layers the logits agree to a small fraction of their spread; docs/export.md states the bound the
  test uses, max |difference| <= 2% of the logits' standard deviation (measured at most 0.72% on the SFT'd mini
  base), and every position's argmax equal;
- greedy continuations (no repetition penalty) are the same tokens, except after an exact tie: where they part,
  the reference's own two candidates must lie within that 2% of each other (on the SFT'd mini base 7 of 8
  32-token continuations were identical; the eighth parted at a margin of 0.005% of the std);
- q8_0 (blocks of 32 weights in 8 bits with a scale; llama.cpp also rounds the activations to 8 bits for its
  matrix products) loads and tokenizes the same; its logits differ by at most 2% of their standard deviation on
  average and 25% at worst (measured 0.8% and 14%), the argmax at 90% of the positions or more (measured all).
  It runs with llama.cpp's weight repacking off: on CPUs with AMX (this machine's), this llama.cpp's AMX path
  for q8_0 crashes (segfault in the first decode; upstream ggml-org/llama.cpp#20824), and docs/export.md says so.
"""

from __future__ import annotations

import json
import sys
import tarfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.eval.parallel_set import load_pairs
from bailong.export import export, inference_chat_template
from bailong.gguf import (
    CONVERTER,
    GGUFError,
    check_no_custom_code,
    convert_to_gguf,
    converter_script,
    extract_converter,
)
from bailong.tokenization import SP_MODEL_FILE, sentencepiece_matches
from conftest import ROOT, free_port, running_server

needs_llama_cpp = pytest.mark.skipif(
    find_spec("llama_cpp") is None, reason="the gguf extra: pip install -e '.[gguf]' (builds llama.cpp)"
)
# the tests on a real run: a smoke pre-training run (about 35 s) shared with tests/test_serve.py, then llama.cpp
PARALLEL = ROOT / "data" / "parallel" / "libreoffice_help.jsonl.gz"
F16_BOUND = 0.02  # f16 logits: max |difference| / the logits' standard deviation (docs/export.md)


def held_out_texts(n: int = 40) -> list[str]:
    pairs = load_pairs(PARALLEL, "test")[:n]
    return [p["tc"] for p in pairs] + [p["en"] for p in pairs]


@pytest.fixture(scope="module")
def hf(smoke_export):
    _, out = smoke_export
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def open_gguf(path: Path):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=512, logits_all=True, verbose=False, seed=0, n_threads=1)


@pytest.fixture(scope="module")
def f16(smoke_export):
    _, out = smoke_export
    llm = open_gguf(convert_to_gguf(out, out / "model-f16.gguf", "f16"))
    yield llm
    llm.close()


def logits_pair(llm, model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    return np.array(llm.scores[: len(ids)]), reference


def prompts(tok) -> list[list[int]]:
    texts = held_out_texts(3)
    chat = tok.apply_chat_template([{"role": "user", "content": texts[0]}], add_generation_prompt=True, tokenize=False)
    texts_ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    return texts_ids + [tok(chat, add_special_tokens=False)["input_ids"]]


@pytest.mark.slow
def test_export_carries_the_sentencepiece_model_and_a_renderable_template(smoke_export, hf):
    run, out = smoke_export
    _, tok = hf
    assert (run / "adapter" / SP_MODEL_FILE).is_file()  # the run keeps it, the export copies it
    assert sentencepiece_matches(tok, out / SP_MODEL_FILE) and len(tok) > 5000  # extended: more than the base
    assert "{% generation %}" not in tok.chat_template and tok.chat_template
    from bailong.data.chat import CHAT_TEMPLATE

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "台北在哪裡？"},
        {"role": "assistant", "content": "在臺灣北部。"},
        {"role": "user", "content": "And Tainan?"},
    ]
    for template in (CHAT_TEMPLATE, None):  # SFT'd runs carry CHAT_TEMPLATE; a pre-training run has none
        rendered = tok.apply_chat_template(
            conversation, chat_template=inference_chat_template(template), tokenize=False, add_generation_prompt=True
        )
        assert rendered == tok.apply_chat_template(
            conversation, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_tokenizes_held_out_text_as_the_extended_tokenizer(hf, f16):
    _, tok = hf
    texts = held_out_texts()
    assert any(any(i >= 5000 for i in tok(t, add_special_tokens=False)["input_ids"]) for t in texts)  # new tokens
    for text in texts:
        assert (
            f16.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            == tok(text, add_special_tokens=False)["input_ids"]
        ), text
    assert f16.tokenize(b"x", add_bos=True)[0] == tok.bos_token_id


@pytest.mark.slow
@needs_llama_cpp
def test_f16_logits_match_the_exported_model(hf, f16):
    model, tok = hf
    for ids in prompts(tok):
        gguf_logits, reference = logits_pair(f16, model, ids)
        assert np.abs(gguf_logits - reference).max() <= F16_BOUND * reference.std()
        assert (gguf_logits.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.slow
@needs_llama_cpp
def test_greedy_continuation_is_the_same(hf, f16):
    model, tok = hf
    for ids in prompts(tok):
        with torch.no_grad():  # the export's generation config has the paper's repetition penalty: off on both sides
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.0, pad_token_id=2
            )
        expected = out[0, len(ids) :].tolist()
        f16.reset()
        got = []
        for token in f16.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(token)
            if token == f16.token_eos() or len(got) == len(expected):
                break
        split = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if split is None:
            assert got == expected
        else:  # a tie within f16's error: the reference's own logits for the two tokens are that close
            with torch.no_grad():
                logits = model(torch.tensor([ids + expected[:split]])).logits[0, -1]
            assert logits[expected[split]] - logits[got[split]] <= F16_BOUND * logits.std()


@pytest.mark.slow
@needs_llama_cpp
def test_q8_0_loads_tokenizes_and_stays_close(smoke_export, hf, monkeypatch):
    import llama_cpp

    _, out = smoke_export
    model, tok = hf
    default_params = llama_cpp.llama_model_default_params

    def no_repacking():  # llama-cli's --no-repack (see the module docstring)
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repacking)
    llm = open_gguf(convert_to_gguf(out, out / "model-q8_0.gguf", "q8_0"))
    try:
        text = held_out_texts(1)[0]
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
        gguf_logits, reference = logits_pair(llm, model, prompts(tok)[0])
        difference = np.abs(gguf_logits - reference) / reference.std()
        assert difference.mean() <= 0.02 and difference.max() <= 0.25
        assert (gguf_logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    finally:
        llm.close()


@pytest.mark.slow
@needs_llama_cpp
def test_export_cli_writes_the_gguf_beside_the_model(smoke_export, tmp_path, capsys):
    from bailong.export import main

    run, _ = smoke_export
    main([str(run), str(tmp_path / "m"), "--gguf", "--gguf-type", "f16"])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "m"), str(tmp_path / "m" / "m-f16.gguf")]
    assert (tmp_path / "m" / "m-f16.gguf").stat().st_size > 0


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_server_answers_with_the_files_chat_template(smoke_export, hf, f16, tmp_path):
    """``python -m bailong.serve <file>.gguf``: llama-cpp-python's OpenAI-compatible server renders the chat template
    the converter wrote into the file; its greedy reply (repetition penalty off) is the exported model's."""
    import httpx

    _, out = smoke_export
    model, tok = hf
    port = free_port()
    command = [sys.executable, "-m", "bailong.serve", str(out / "model-f16.gguf"), "--port", str(port)]
    messages = [{"role": "user", "content": held_out_texts(1)[0]}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    with torch.no_grad():
        reference = model.generate(
            torch.tensor([ids["input_ids"]]), max_new_tokens=16, do_sample=False, repetition_penalty=1.0, pad_token_id=2
        )
    expected = tok.decode(reference[0, len(ids["input_ids"]) :], skip_special_tokens=True)
    with running_server(command, f"http://127.0.0.1:{port}/v1/models", tmp_path / "server.log"):
        body = {"model": "model-f16", "messages": messages, "max_tokens": 16, "temperature": 0, "repeat_penalty": 1.0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].strip() == expected.strip()
    with pytest.raises(httpx.TransportError):  # stopping bailong.serve stopped the server: it is that process
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)


# -- no llama.cpp needed -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bbpe_export(tmp_path_factory) -> Path:
    """An experiment=smoke run on the byte-level mini base (model=mini_bbpe), exported."""
    from bailong.stages import run
    from conftest import compose_config

    out = tmp_path_factory.mktemp("smoke_bbpe")
    run(compose_config(["experiment=smoke", "model=mini_bbpe", "logger=csv", "eval.base=false"], output_dir=out / "r"))
    return export(out / "r", out / "export")


@pytest.mark.slow
@needs_llama_cpp
def test_a_byte_level_export_converts_with_its_pre_tokenizer_and_tokenizes_alike(bbpe_export):
    """llama.cpp names a BPE pre-tokenizer by a hash of its base's vocabulary: the byte-level mini base is not one
    it lists, so conversion stops with what to pass; named (Llama 3's pattern), the file tokenizes held-out TC and
    English exactly as the extended tokenizer does, new merges included."""
    from llama_cpp import Llama

    with pytest.raises(GGUFError, match="--pre .*llama-bpe"):
        convert_to_gguf(bbpe_export, bbpe_export / "unnamed.gguf", "f16")
    path = convert_to_gguf(bbpe_export, bbpe_export / "model-f16.gguf", "f16", pre_tokenizer="llama-bpe")
    tok = AutoTokenizer.from_pretrained(bbpe_export)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    texts = held_out_texts()
    assert any(any(i >= 5000 for i in tok(t, add_special_tokens=False)["input_ids"]) for t in texts)  # new merges
    for text in texts:
        assert (
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            == tok(text, add_special_tokens=False)["input_ids"]
        ), text
    assert llm.tokenize(b"x", add_bos=True)[0] == tok.bos_token_id == 4998
    llm.close()


def test_the_base_view_of_an_extended_byte_level_tokenizer_encodes_as_the_base(tmp_path):
    """What the converter hashes to name the pre-tokenizer (a text with Chinese in it): the extended tokenizer
    encodes it differently from its base; without the appended tokens and merges it encodes it as the base does."""
    from bailong.gguf_converter import base_view
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    base_dir = ROOT / "models" / "mini-base-bbpe"
    import gzip

    with gzip.open(ROOT / "data" / "zh_tw" / "modern.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    extended = load_tokenizer(extend_tokenizer(base_dir, texts, 300, tmp_path).path)
    base = load_tokenizer(base_dir)
    probe = "3 33 333 3333 ?我想在apple工作1314151天～ 這個軟體的說明文件 I've been 'told he's there"
    assert extended.encode(probe) != base.encode(probe)
    view = base_view(extended, len(base))
    assert len(view) == len(base) and view.encode(probe) == base.encode(probe)


def test_a_directory_with_its_own_code_is_not_converted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    with pytest.raises(GGUFError, match="auto_map.*trust_remote_code"):
        check_no_custom_code(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    check_no_custom_code(tmp_path)
    (tmp_path / "modeling_x.py").write_text("import os\n")
    with pytest.raises(GGUFError, match="modeling_x.py"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", llama_cpp_dir=tmp_path)


def test_conversion_errors_name_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="gguf_type='q4'.*f16"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "q4")
    with pytest.raises(GGUFError, match=f"--llama-cpp={tmp_path}: no {CONVERTER}"):
        converter_script(tmp_path)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(GGUFError, match=rf"\$LLAMA_CPP_DIR={tmp_path}: no {CONVERTER}"):
        converter_script()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(GGUFError, match="no tokenizer.model"):
        convert_to_gguf(bare, tmp_path / "x.gguf", llama_cpp_dir=tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        export(tmp_path / "run", bare)
    with pytest.raises(ValueError, match="gguf_type='q4'"):
        export(tmp_path / "run", tmp_path / "new", gguf_type="q4")


def test_only_the_converter_is_unpacked_from_the_source_distribution(tmp_path):
    src = tmp_path / "src" / "llama_cpp_python-9.9.9"
    files = {
        "vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
        "vendor/llama.cpp/conversion/__init__.py": "",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        "vendor/llama.cpp/src/llama.cpp": "// not needed\n",
        "llama_cpp/__init__.py": "",
    }
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    out = tmp_path / "out"
    extract_converter(sdist, out)
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert found == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    (src / "vendor/llama.cpp/convert_hf_to_gguf.py").unlink()
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    with pytest.raises(GGUFError, match="no vendor/llama.cpp/convert_hf_to_gguf.py"):
        extract_converter(sdist, tmp_path / "out2")


def test_only_a_sentencepiece_vocabulary_needs_tokenizer_model(tmp_path):
    """llama.cpp's converter reads a byte-level BPE vocabulary (Llama 3, Qwen 2.5) from tokenizer.json alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bailong.gguf import needs_sentencepiece_model

    assert needs_sentencepiece_model(tmp_path)  # nothing to tell: ask for it
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    byte_level.save(str(tmp_path / "tokenizer.json"))
    assert not needs_sentencepiece_model(tmp_path)
    assert needs_sentencepiece_model(ROOT / "models" / "mini-base")  # SentencePiece-style (Metaspace) BPE
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GGUFError, match=f"--llama-cpp={tmp_path}: no {CONVERTER}"):  # past the tokenizer check
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", llama_cpp_dir=tmp_path)
