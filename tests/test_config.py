"""Every shipped config file composes against the schema; mistakes fail with Hydra's own clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from bailong.embedding import (
    InitOptions,
    NewRows,
    available_strategies,
    get_strategy,
    register,
    registry,
    rows_depend_on,
)
from tests.conftest import ROOT

GROUPS = [
    "model",
    "tokenizer",
    "init",
    "quant",
    "lora",
    "finetune",
    "data",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "mc",
    "bench",
    "judge",
    "hparams_search",
]


def options(group: str) -> list[str]:
    """The group's options: its YAML files and its ConfigStore entries (the ``init`` strategies' options classes)."""
    files = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
    stored = {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)} if group == "init" else set()
    return sorted(files | stored)


def test_default_config_composes(make_config, tmp_path):
    cfg = make_config(output_dir=tmp_path)
    assert cfg.model.name == "mini" and cfg.init.name == "zip_tie" and cfg.quant.name == "nf4"
    assert cfg.paths.output_dir == str(tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(make_config, tmp_path, group, option):
    cfg = make_config([f"{group}={option}"], output_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    if group == "init":
        assert cfg.init.name == option


def test_init_options_are_their_strategy_s_options_class_with_its_defaults(make_config):
    assert options("init") == available_strategies()
    for name in available_strategies():
        init = make_config([f"init={name}"]).init
        schema = get_strategy(name).options
        assert OmegaConf.get_type(init) is schema
        assert OmegaConf.to_container(init) == dataclasses.asdict(schema(name=name))


def test_a_key_of_another_strategy_fails_at_compose_time(make_config):
    with pytest.raises(ConfigCompositionException, match="init.steps") as err:
        make_config(["init=mean", "init.steps=3"])
    assert "Key 'steps' not in 'MeanOptions'" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="init.steps"):  # distill's key, not zip_tie's
        make_config(["init=zip_tie", "init.steps=3"])
    with pytest.raises(ConfigCompositionException, match="init.std"):
        make_config(["init=random", "init.std=wide"])  # the options' types are checked too
    cfg = make_config(["init=distill", "init.steps=3", "init.shift_bias=0.9"])  # distill extends zip_tie
    assert (cfg.init.steps, cfg.init.shift_bias) == (3, 0.9)


def test_an_experiment_s_init_keys_fail_under_a_strategy_that_lacks_them(make_config):
    assert make_config(["experiment=bailong_7b"]).init.shift_max_tokens == 2_000_000
    assert make_config(["experiment=bailong_7b", "init=distill"]).init.shift_max_tokens == 2_000_000
    with pytest.raises(ConfigCompositionException, match="shift_max_tokens"):
        make_config(["experiment=bailong_7b", "init=mean"])


@dataclass
class ToyOptions(InitOptions):
    scale: float = 2.0


@pytest.fixture
def toy_strategy():
    """A strategy registered as a new module would register it; unregistered afterwards."""
    register("toy", ToyOptions)(lambda ctx, options: NewRows(None, None))
    yield
    del registry._STRATEGIES["toy"]
    del ConfigStore.instance().repo["init"]["toy.yaml"]


def test_a_registered_strategy_is_an_init_option_with_nothing_else_to_edit(toy_strategy, make_config):
    cfg = make_config(["init=toy", "init.scale=3"])
    assert OmegaConf.get_type(cfg.init) is ToyOptions
    assert rows_depend_on(OmegaConf.to_object(cfg.init), 1) == {
        "strategy": "toy",
        "options": {"scale": 3.0},
        "seed": None,
        "corpus": False,
    }
    with pytest.raises(ConfigCompositionException, match="init.steps"):
        make_config(["init=toy", "init.steps=3"])


def test_unknown_option_lists_choices(make_config):
    with pytest.raises(ConfigCompositionException) as err:
        make_config(["init=zip_tye"])
    message = str(err.value)
    assert "zip_tye" in message and "zip_tie" in message and "mean" in message


def test_misspelt_key_fails(make_config):
    with pytest.raises(ConfigCompositionException, match="rank"):
        make_config(["lora.rank=8"])


def test_wrong_type_fails(make_config):
    with pytest.raises(ConfigCompositionException, match="lora.r"):
        make_config(["lora.r=eight"])


def test_trainer_keys_are_lightning_arguments(make_config, tmp_path):
    import inspect

    import lightning.pytorch as pl

    cfg = make_config(output_dir=tmp_path)
    accepted = set(inspect.signature(pl.Trainer).parameters)
    assert set(cfg.trainer) - {"_target_"} <= accepted
