"""A run's result does not depend on the state of the cache, and the init rows' cache key holds exactly
what the rows depend on.

- Initialisation leaves the global RNGs as it found them (a cache hit draws nothing, so a miss must not
  either): per strategy, and end to end, a cold and a warm cache give bit-identical metrics.
- Each strategy's declared dependencies (``RowInputs``: seed, corpus, options) match what its rows do:
  what it declares unused changes no row; the seed it declares used changes them.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from bailong.embedding import EmbeddingInitError, get_strategy, global_rng_kept, init_options, rows_depend_on
from bailong.embedding.distill import DistillOptions
from bailong.embedding.zip_tie import ZipTieOptions
from conftest import compose_config
from test_embedding import (  # noqa: F401  (module fixtures: the tiny tokenizers, model and corpus)
    FAST_DISTILL,
    FAST_SHIFT,
    STRATEGIES,
    as_options,
    base_model,
    new_rows,
    run,
    texts,
    tokenizers,
)
from test_pipeline import SMOKE

FAST = {"distill": FAST_DISTILL, "zip_tie": FAST_SHIFT}


def global_rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def assert_same_rng_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]), "torch's global RNG moved"
    assert before[1] == after[1], "Python's random moved"
    assert np.array_equal(before[2], after[2]), "NumPy's global RNG moved"


# ------------------------------------------------------------------------------------------------
# the global RNGs


@pytest.mark.parametrize("name", STRATEGIES)
def test_initialisation_leaves_the_global_rngs_as_they_were(name, base_model, tokenizers, texts):
    # before the fix the resize alone moved torch's generator, for every strategy (new nn.Embedding/Linear
    # initialise themselves even under no_init_weights)
    torch.manual_seed(123)
    before = global_rng_states()
    run(base_model, tokenizers, {"name": name, **FAST.get(name, {})}, texts=texts["tc"][:20], seed=3)
    assert_same_rng_states(before, global_rng_states())


def test_global_rng_kept_undoes_draws_from_every_global_rng():
    before = global_rng_states()
    with global_rng_kept("cpu"):
        torch.rand(3), random.random(), np.random.rand(3)
    assert_same_rng_states(before, global_rng_states())
    with pytest.raises(RuntimeError), global_rng_kept("cpu"):  # restored on the way out of a failure too
        torch.rand(3)
        raise RuntimeError("strategy failed")
    assert_same_rng_states(before, global_rng_states())


# ------------------------------------------------------------------------------------------------
# declared dependencies match the rows


def declared(name: str, cfg: dict):
    strategy = get_strategy(name)
    return strategy.row_inputs(init_options(name, **{k: v for k, v in cfg.items() if k != "name"}))


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_seed_changes_the_rows_exactly_when_declared(name, base_model, tokenizers, texts):
    # zip_tie's first_shift reads the corpus in a seeded document order; with the whole corpus far under
    # shift_max_tokens the order still decides which text shares a chunk, so the rows still move
    cfg = {"name": name, **FAST.get(name, {})}
    num_base = len(tokenizers[0])
    corpus = texts["tc"][:30]
    a, b = (new_rows(run(base_model, tokenizers, cfg, corpus, seed=s)[0], num_base) for s in (5, 6))
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    assert same != declared(name, FAST.get(name, {})).seed
    assert (rows_depend_on(as_options(cfg), 5) == rows_depend_on(as_options(cfg), 6)) == same


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("mean", {}),
        ("subword_mean", {}),
        ("random", {}),
        ("multivariate", {}),
        ("zip_tie", {"output_rule": "weighted_first"}),
        ("distill", {**FAST_DISTILL, "steps": 0, "start_from": "subword_mean"}),
    ],
)
def test_strategies_declared_corpus_free_ignore_the_corpus(name, cfg, base_model, tokenizers, texts):
    assert not declared(name, cfg).corpus
    num_base = len(tokenizers[0])
    cfg = {"name": name, **cfg}
    a = new_rows(run(base_model, tokenizers, cfg, texts["tc"][:20], seed=1)[0], num_base)
    b = new_rows(run(base_model, tokenizers, cfg, texts["tc"][20:45], seed=1)[0], num_base)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_options_a_strategy_does_not_read_leave_its_key_alone():
    zip_tie = {"name": "zip_tie", "output_rule": "last", "input_rule": "mean"}
    key = rows_depend_on(as_options(zip_tie), 1)
    # zip_tie's shift options under a piece rule change nothing, and neither does the seed
    for unread in ({"shift_bias": 0.9}, {"shift_max_tokens": 10}, {"absorbed_mass_bias": False}):
        assert rows_depend_on(as_options({**zip_tie, **unread}), 2) == key, unread
    assert rows_depend_on(as_options({**zip_tie, "input_rule": "first"}), 1) != key
    first_shift = {"name": "zip_tie", "output_rule": "first_shift"}
    assert rows_depend_on(as_options({**first_shift, "shift_bias": 0.9}), 1) != rows_depend_on(
        as_options(first_shift), 1
    )
    assert rows_depend_on(as_options({"name": "mean"}), 1) == {
        "strategy": "mean",
        "options": {},
        "seed": None,
        "corpus": False,
    }


def test_a_key_of_another_strategy_is_refused_not_ignored():
    # each strategy's options class is its schema: Hydra refuses another strategy's key when it composes,
    # and a mapping handed to the library is held to the same schema
    for init, key in (("mean", "steps"), ("zip_tie", "steps"), ("zip_tie", "std"), ("random", "covariance_scale")):
        with pytest.raises(ConfigCompositionException, match=f"init.{key}"):
            compose_config([f"init={init}", f"init.{key}=7"])
        with pytest.raises(EmbeddingInitError, match=f"\\['{key}'\\] are not options of '{init}'"):
            rows_depend_on(as_options({"name": init, key: 7}), 1)


def test_zip_tie_s_key_holds_its_own_options_and_distill_s_holds_them_too():
    zip_tie = rows_depend_on(as_options(compose_config(["init=zip_tie"]).init), 1)
    own = {f.name for f in dataclasses.fields(ZipTieOptions)} - {"name"}
    assert set(zip_tie["options"]) == own  # no distill key, no name (the strategy is keyed on its own)
    distill = compose_config(["init=distill", "init.steps=0"]).init
    assert rows_depend_on(as_options(distill), 1)["options"] == {
        "start_from": "zip_tie",
        "steps": 0,
        **zip_tie["options"],
    }
    trained = rows_depend_on(as_options(compose_config(["init=distill"]).init), 1)["options"]
    assert set(trained) == {f.name for f in dataclasses.fields(DistillOptions)} - {"name"}


def test_every_option_of_a_piece_rule_zip_tie_is_declared_or_ignored(base_model, tokenizers):
    # an option left out of the key must not change the rows: vary every undeclared zip_tie option
    cfg = {"name": "zip_tie", "output_rule": "weighted_last", "input_rule": "first"}
    options = {f.name for f in dataclasses.fields(get_strategy("zip_tie").options)} - {"name"}  # name: the strategy
    undeclared = options - set(declared("zip_tie", cfg).options)
    assert undeclared >= {"shift_bias", "shift_ridge", "shift_max_tokens"}
    num_base = len(tokenizers[0])
    changed = {
        "shift_estimate": "occurrence",
        "shift_bias": 3.0,
        "absorbed_mass_bias": False,
        "shift_ridge": 0.5,
        "shift_max_tokens": 10,
        "shift_seq_len": 16,
        "shift_batch_size": 2,
    }
    assert set(changed) == undeclared
    a = new_rows(run(base_model, tokenizers, cfg)[0], num_base)
    b = new_rows(run(base_model, tokenizers, {**cfg, **changed})[0], num_base)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# the pipeline


def test_seed_free_rows_are_cached_once_for_every_seed(tmp_path):
    """Three seeds of ``mean``: one init_rows entry (16 MB each at the mini base's old key, ~0.9 GB at
    Llama-2 shapes); ``random`` keeps one per seed."""
    from bailong.data.splits import load_splits
    from bailong.stages.common import build_tokenizers, initial_rows

    cache = tmp_path / "cache"
    reports = {}
    for init, seed in [("mean", 1), ("mean", 2), ("mean", 3), ("random", 1), ("random", 2)]:
        cfg = compose_config(
            [*SMOKE, f"init={init}", f"seed={seed}", f"paths.cache_dir={cache}"], output_dir=tmp_path / f"{init}{seed}"
        )
        splits = load_splits(OmegaConf.to_object(cfg.data))
        _, ext, base_tok, tok = build_tokenizers(cfg, splits)
        rows, reports[init, seed] = initial_rows(cfg, base_tok, tok, ext.cache_key, splits)
    assert [reports["mean", s]["cached"] for s in (1, 2, 3)] == [False, True, True]
    assert [reports["random", s]["cached"] for s in (1, 2)] == [False, False]
    assert reports["mean", 3]["seed"] is None and reports["random", 2]["seed"] == 2
    assert reports["mean", 3]["computed_by_run"] == str(tmp_path / "mean1")
    entries = sorted(p.name for p in (cache / "init_rows").iterdir() if not p.name.startswith("."))
    assert len(entries) == 3, entries


@pytest.mark.slow
def test_a_cold_and_a_warm_cache_give_identical_metrics(tmp_path):
    """The same config twice on one cache: the first run computes tokenizer, base metrics and init rows,
    the second reads them. Every metric agrees to the last bit (before the fix final/tc_bpc moved in the
    fourth decimal: the resize had drawn from the RNG that then initialised LoRA and its dropout)."""
    from bailong.stages import run as run_pipeline

    cache = tmp_path / "cache"
    metrics, reports = {}, {}
    for state in ("cold", "warm"):
        out = tmp_path / state
        cfg = compose_config(
            [*SMOKE, "trainer.max_steps=3", "trainer.val_check_interval=3", f"paths.cache_dir={cache}"], output_dir=out
        )
        metrics[state] = run_pipeline(cfg)
        reports[state] = json.loads((out / "init_report.json").read_text())
    print(f"final/tc_bpc cold {metrics['cold']['final/tc_bpc']!r} warm {metrics['warm']['final/tc_bpc']!r}")
    print(f"final/en_bpc cold {metrics['cold']['final/en_bpc']!r} warm {metrics['warm']['final/en_bpc']!r}")
    assert (reports["cold"]["cached"], reports["warm"]["cached"]) == (False, True)
    assert (metrics["cold"]["tokenizer/cached"], metrics["warm"]["tokenizer/cached"]) == (False, True)
    assert reports["cold"]["strategy"] == "zip_tie"  # the default: the corpus pass runs on the cold side
    varying = {"train/seconds", "train/tokens_per_sec", "tokenizer/cached"}
    cold = {k: v for k, v in metrics["cold"].items() if k not in varying}
    warm = {k: v for k, v in metrics["warm"].items() if k not in varying}
    assert cold.keys() == warm.keys()
    assert {k: (cold[k], warm[k]) for k in cold if cold[k] != warm[k]} == {}  # exact: == on every float
