"""The evaluator registry (bailong/eval/evaluators.py), the one evaluation CLI (``python -m bailong.eval``), the
inference loader (bailong/model/loading.py), the paper's sampling defined once, and the eval settings' range
checks."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.config import CorpusConfig, DataConfig
from bailong.errors import ConfigError
from bailong.eval import evaluators as ev
from bailong.eval.__main__ import main
from bailong.eval.bpc import bits_per_char
from bailong.eval.config import PAPER_SAMPLING, BenchConfig, EvalConfig, JudgeConfig, MCConfig
from bailong.eval.evaluators import EvalContext, Evaluator, register_evaluator, run_evaluators
from conftest import ROOT, compose_config

MINI = ROOT / "models" / "mini-base"
POEM = ["春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。", "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"]


@pytest.fixture(scope="module")
def mini():
    return AutoModelForCausalLM.from_pretrained(MINI).eval(), AutoTokenizer.from_pretrained(MINI)


# -- range checks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (BenchConfig, {"top_p": 1.5}, r"bench.top_p=1.5: expected a number in \(0, 1\]"),
        (BenchConfig, {"top_p": 0}, r"bench.top_p=0: expected a number in \(0, 1\]"),
        (BenchConfig, {"temperature": 0.0}, r"bench.temperature=0.0: expected a number > 0"),
        (BenchConfig, {"top_k": -1}, r"bench.top_k=-1: expected an integer >= 0"),
        (BenchConfig, {"repetition_penalty": 0}, r"bench.repetition_penalty=0: expected a number > 0"),
        (BenchConfig, {"max_new_tokens": 0}, r"bench.max_new_tokens=0: expected an integer >= 1"),
        (BenchConfig, {"max_prompts": 0}, r"bench.max_prompts=0: expected null \(all\) or an integer >= 1"),
        (MCConfig, {"items_per_lang": 0}, r"mc.items_per_lang=0: expected an integer >= 1"),
        (MCConfig, {"num_choices": 1}, r"mc.num_choices=1: expected an integer >= 2"),
        (MCConfig, {"context_lines": 0}, r"mc.context_lines=0: expected an integer >= 1"),
        (MCConfig, {"max_len": 1}, r"mc.max_len=1: expected an integer >= 2"),
        (MCConfig, {"batch_size": 0}, r"mc.batch_size=0: expected an integer >= 1"),
        (MCConfig, {"en_length_tolerance": -0.1}, r"mc.en_length_tolerance=-0.1: expected a number >= 0"),
        (JudgeConfig, {"timeout_s": 0}, r"judge.timeout_s=0: expected a number of seconds > 0"),
        (JudgeConfig, {"max_retries": -1}, r"judge.max_retries=-1: expected an integer >= 0"),
        (JudgeConfig, {"backoff_s": -1.0}, r"judge.backoff_s=-1.0: expected a number of seconds >= 0"),
        (JudgeConfig, {"backoff_s": 5.0, "max_backoff_s": 2.0}, r"judge.max_backoff_s=2.0: .*>= judge.backoff_s"),
        (JudgeConfig, {"max_tokens": 0}, r"judge.max_tokens=0: expected an integer >= 1"),
        (JudgeConfig, {"temperature": -0.5}, r"judge.temperature=-0.5: expected a number >= 0"),
        (EvalConfig, {"batch_size": 0}, r"eval.batch_size=0: expected an integer >= 1"),
        (
            EvalConfig,
            {"seq_len": 1},
            r"eval.seq_len=1: expected null \(the model's max_position_embeddings\) or an integer >= 10",
        ),
    ],
)
def test_a_value_out_of_range_names_the_key(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


def test_unresolved_values_are_not_checked_and_edges_pass():
    """OmegaConf builds defaults through these classes with MISSING and interpolations as values."""
    BenchConfig(prompts="???", top_p="${x.y}", max_new_tokens="???", max_prompts=None)
    JudgeConfig(timeout_s="${oc.env:T}", backoff_s="???", max_backoff_s=1.0)
    MCConfig(items_per_lang="???", num_choices="${n}")
    EvalConfig(seq_len=None, batch_size="???")
    BenchConfig(top_p=1.0, top_k=0, max_prompts=1)
    JudgeConfig(backoff_s=0.0, max_backoff_s=0.0, max_retries=0, temperature=0.0)
    MCConfig(en_length_tolerance=0.0, num_choices=2)


@pytest.mark.parametrize("overrides", [[], ["experiment=sft"]])
def test_shipped_configs_compose_and_convert(tmp_path, overrides):
    cfg = compose_config(overrides, tmp_path)
    for section, cls in (("eval", EvalConfig), ("mc", MCConfig), ("bench", BenchConfig), ("judge", JudgeConfig)):
        assert isinstance(OmegaConf.to_object(cfg[section]), cls), section


@pytest.mark.parametrize(
    "override, message",
    [
        ("bench.top_p=1.5", r"bench.top_p=1.5: expected a number in \(0, 1\]"),
        ("mc.num_choices=1", r"mc.num_choices=1: expected an integer >= 2"),
        ("judge.max_backoff_s=0.5", r"judge.max_backoff_s=0.5: expected a number >= judge.backoff_s \(1.0\)"),
        ("eval.seq_len=1", r"eval.seq_len=1"),
    ],
)
def test_a_bad_override_fails_when_converted(tmp_path, override, message):
    cfg = compose_config([override], tmp_path)
    section = override.split(".")[0]
    with pytest.raises(ConfigError, match=message):
        OmegaConf.to_object(cfg[section])
    with pytest.raises(ConfigError, match=message):
        EvalContext.from_config(cfg, None, None, tmp_path)


# -- the paper's sampling, once ---------------------------------------------------------------------------------
def test_the_papers_sampling_is_defined_once(tmp_path):
    assert dataclasses.asdict(PAPER_SAMPLING) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
    }
    bench = OmegaConf.to_object(compose_config([], tmp_path).bench)
    assert (bench.temperature, bench.top_p, bench.top_k, bench.repetition_penalty) == dataclasses.astuple(
        PAPER_SAMPLING
    )
    assert bench.do_sample is False  # the bench decodes greedily unless asked
    # one definition in the code and none in the configs: each number written once, in bailong/eval/config.py
    for key, value in (("temperature", "0.6"), ("top_p", "0.9"), ("top_k", "40"), ("repetition_penalty", "1.1")):
        written = re.compile(rf"""\b{key}["']?\s*(:\s*(int|float)\s*)?[:=]\s*{re.escape(value)}\b""")
        places = [
            path.relative_to(ROOT).as_posix()
            for path in [*(ROOT / "bailong").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]
            if written.search(path.read_text(encoding="utf-8"))
        ]
        assert places == ["bailong/eval/config.py"], key


# -- the registry ------------------------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry: evaluators registered by a test are gone afterwards."""
    monkeypatch.setattr(ev, "EVALUATORS", dict(ev.EVALUATORS))
    return ev.EVALUATORS


def test_the_built_in_evaluators_are_registered():
    assert {"bpc", "mc", "bench", "chat_bpc"} <= set(ev.EVALUATORS)


def test_a_new_evaluator_is_one_class(registry, tmp_path):
    calls = []

    @register_evaluator
    class Count(Evaluator):
        name = "count"

        def __call__(self, ctx):
            calls.append(ctx.out_dir)
            return {"count/n": float(len(ctx.texts["tc"])), "shared": 1.0}

    @register_evaluator
    class Later(Evaluator):
        name = "later"

        def __call__(self, ctx):
            calls.append("later")
            return {"shared": 2.0}

    ctx = EvalContext(None, None, tmp_path, texts={"tc": POEM})
    assert run_evaluators(["count", "later"], ctx) == {"count/n": 2.0, "shared": 2.0}  # in order, merged
    assert calls == [tmp_path, "later"]
    assert run_evaluators([], ctx) == {}


def test_unknown_names_fail_before_anything_runs(registry, tmp_path):
    ran = []

    @register_evaluator
    class Runs(Evaluator):
        name = "runs"

        def __call__(self, ctx):
            ran.append(1)
            return {}

    with pytest.raises(ValueError, match=r"unknown evaluator 'bcp': registered are .*bpc.*mc.*bench.*chat_bpc"):
        run_evaluators(["runs", "bcp"], EvalContext(None, None, tmp_path))
    assert ran == []
    with pytest.raises(TypeError, match="list of evaluator names"):
        run_evaluators("bpc", EvalContext(None, None, tmp_path))
    with pytest.raises(ValueError, match="the mc evaluator needs the data config"):
        run_evaluators(["mc"], EvalContext(None, None, tmp_path))


def test_registration_needs_a_name_and_refuses_a_second_class(registry):
    with pytest.raises(TypeError, match="needs a class attribute name"):

        @register_evaluator
        class Nameless(Evaluator):
            pass

    with pytest.raises(ValueError, match="'bpc' is registered twice"):

        @register_evaluator
        class OtherBpc(Evaluator):
            name = "bpc"


def test_from_config_gives_typed_settings(tmp_path):
    cfg = compose_config(["eval.seq_len=96", "data.split_seed=7", "eval.batch_size=3", "bench.max_prompts=2"], tmp_path)
    ctx = EvalContext.from_config(cfg, "m", "t", str(tmp_path / "out"), texts={"tc": POEM})
    assert (ctx.model, ctx.tokenizer, ctx.out_dir, ctx.texts) == ("m", "t", tmp_path / "out", {"tc": POEM})
    assert isinstance(ctx.eval, EvalConfig) and (ctx.eval.batch_size, ctx.eval.seq_len) == (3, 96)
    assert isinstance(ctx.bench, BenchConfig) and ctx.bench.max_prompts == 2
    assert ctx.bench.prompts == str(ROOT / "data" / "bench" / "prompts.jsonl")  # interpolation resolved
    assert isinstance(ctx.judge, JudgeConfig) and isinstance(ctx.mc, MCConfig)
    assert ctx.mc.tc_sources and all(isinstance(s, CorpusConfig) for s in ctx.mc.tc_sources + ctx.mc.en_sources)
    assert isinstance(ctx.data, DataConfig) and (ctx.data.val_fraction, ctx.data.split_seed) == (0.02, 7)
    assert ctx.cache_dir == Path(cfg.paths.cache_dir)  # where mc's items are prepared: the run's cache
    assert ctx.chat_batches is None


def test_bpc_and_chat_bpc_evaluators(mini, tmp_path):
    from bailong.data.windows import collate_windows, scoring_windows

    model, tok = mini
    ctx = EvalContext(model, tok, tmp_path, texts={"tc": POEM}, eval=EvalConfig(batch_size=2, seq_len=32))
    expected = bits_per_char(model, tok, POEM, seq_len=32, batch_size=2)
    scores = run_evaluators(["bpc", "chat_bpc"], ctx)  # no chat data: chat_bpc adds nothing
    assert scores == {f"tc_{k}": v for k, v in expected.items()}
    ctx.eval = EvalConfig(seq_len=16)  # more, shorter windows
    assert run_evaluators(["bpc"], ctx)["tc_bpc"] == pytest.approx(bits_per_char(model, tok, POEM, seq_len=16)["bpc"])
    ctx.eval = EvalConfig()  # default: windows of the model's own positions
    whole = bits_per_char(model, tok, POEM, seq_len=model.config.max_position_embeddings)
    assert run_evaluators(["bpc"], ctx)["tc_bpc"] == pytest.approx(whole["bpc"])
    ctx.chat_batches = lambda: [collate_windows(scoring_windows(tok, POEM, seq_len=32))]
    model.train()
    assert run_evaluators(["chat_bpc"], ctx) == {"chat_bpc": pytest.approx(expected["bpc"])}
    assert model.training  # scoring_mode gave the mode back
    model.eval()
    with pytest.raises(ValueError, match="needs held-out text"):
        run_evaluators(["bpc"], EvalContext(model, tok, tmp_path))


# -- the one CLI ---------------------------------------------------------------------------------------------
def test_cli_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        main([str(MINI), "--tc", "x.txt"])  # the old form, without a subcommand
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bpc", str(MINI)])
    assert "give at least one file with --tc or --en" in capsys.readouterr().err


def test_cli_bpc_on_a_base_model(capsys):
    args = ["bpc", str(MINI), "--en", str(ROOT / "data/en/kjv.jsonl.gz"), "--max-chars", "400", "--seq-len", "64"]
    scores = main([*args, "--quant", "none"])
    assert set(scores) >= {"base/en_bpc", "base/en_bpb", "base/en_tokens_per_char"} and 0 < scores["base/en_bpc"] < 10
    assert json.loads(capsys.readouterr().out) == scores


def test_cli_mc_writes_under_out(tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = main(["mc", str(MINI), "--out", str(out), "--quant", "none", "mc.items_per_lang=4"])
    assert metrics["mc/tc_n"] == 4.0 and metrics["mc/en_n"] == 4.0 and 0 <= metrics["mc/tc_acc"] <= 1
    assert not any(k.startswith("bench/") for k in metrics)
    assert len((out / "mc" / "tc.jsonl").read_text().splitlines()) == 4 and not (out / "bench").exists()


def test_cli_checks_the_settings_before_loading_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):  # the target does not exist: loading it would fail differently
        main(["bench", str(tmp_path / "nowhere"), "--out", str(tmp_path), "bench.top_p=1.5"])
    assert "bench.top_p=1.5: expected a number in (0, 1]" in capsys.readouterr().err


# -- the loader --------------------------------------------------------------------------------------------------
def test_load_for_inference_on_a_base(tmp_path, monkeypatch):
    from bailong.model.loading import load_for_inference, saved_dtype

    monkeypatch.setenv("BAILONG_CACHE", str(tmp_path / "cache"))
    kind, model, tok = load_for_inference(MINI, quant="none", device="cpu")
    assert kind == "base" and not model.training
    assert (tmp_path / "cache" / "tokenizers").is_dir()  # the base tokenizer, built where bailong.cache says
    assert tok("春眠不覺曉")["input_ids"] == AutoTokenizer.from_pretrained(MINI)("春眠不覺曉")["input_ids"]
    with pytest.raises(ValueError, match="quant='int8': expected one of nf4, none"):
        load_for_inference(MINI, quant="int8")
    (tmp_path / "m").mkdir()
    assert saved_dtype(tmp_path / "m") == "float32"
    (tmp_path / "m" / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert saved_dtype(tmp_path / "m") == "bfloat16"
