"""Strategy name -> function that computes the new embedding and output rows.

Each strategy is one function ``fn(ctx: InitContext, options) -> NewRows`` registered with the
dataclass of its options. ``parse_options`` reads those options from the ``init`` config, which may
be a flat structured config holding every strategy's keys: keys of other strategies are ignored,
keys no strategy knows are an error (a typo would otherwise be silently dropped).

Each strategy also declares what its rows depend on (``RowInputs``): the options that change them,
whether the run seed does, whether the TC corpus does. Cached rows are keyed on exactly that, so runs
that differ only in what the rows ignore (the seed of ``mean``, ``std`` under ``zip_tie``) share one entry.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bailong.embedding.pieces import EmbeddingInitError, NewTokens


@dataclass
class InitContext:
    """What a strategy may read: the resized model, both tokenizers, the new tokens, the corpus."""

    model: Any  # a transformers causal LM, already resized to the extended vocabulary
    base_tokenizer: Any
    tokenizer: Any
    new: NewTokens
    texts: list[str] | None
    seed: int

    @property
    def num_base(self) -> int:
        return self.new.num_base

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def old_embed(self) -> torch.Tensor:
        """The base rows of the input embedding (a view; never write to it)."""
        return self.embed_weight.detach()[: self.num_base]

    def old_head(self) -> torch.Tensor:
        return self.head_weight.detach()[: self.num_base]

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with the run seed: draws do not depend on the global RNG."""
        return torch.Generator(device="cpu").manual_seed(self.seed)


@dataclass
class NewRows:
    """float32 rows for the new ids, in id order, and what the strategy wants reported."""

    embed: torch.Tensor  # (num_new, hidden)
    head: torch.Tensor  # (num_new, hidden)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class RowInputs:
    """What a strategy's new rows depend on besides the base model and the two tokenizers."""

    options: dict[str, Any]  # the options whose values change the rows
    seed: bool = False  # the run seed changes the rows (a draw, a sample, a document order)
    corpus: bool = False  # the TC training texts change the rows


def every_option(options: Any) -> RowInputs:
    """The default declaration: every option matters, neither the seed nor the corpus does."""
    return RowInputs(dataclasses.asdict(options))


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[InitContext, Any], NewRows]
    options: type
    row_inputs: Callable[[Any], RowInputs] = every_option  # parsed options -> what the rows depend on


_STRATEGIES: dict[str, Strategy] = {}


def register(name: str, options: type = NoOptions, row_inputs: Callable[[Any], RowInputs] = every_option) -> Callable:
    """Decorator: ``@register("mean")`` over ``fn(ctx, options) -> NewRows``; ``row_inputs(options)`` says
    what the rows depend on (default: every option, not the seed, not the corpus). Declaring too little makes
    a cache hand out rows computed for other inputs, so a strategy that draws or reads text must say so."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of strategy {name!r} must be a dataclass, got {options!r}")

    def add(fn: Callable[[InitContext, Any], NewRows]) -> Callable:
        if name in _STRATEGIES:
            raise ValueError(f"init strategy {name!r} is registered twice")
        _STRATEGIES[name] = Strategy(name, fn, options, row_inputs)
        return fn

    return add


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise EmbeddingInitError(
            f"unknown init strategy {name!r}; valid names: {', '.join(available_strategies())}"
        ) from None


def config_items(init_cfg: Any) -> dict[str, Any]:
    """The keys of an init config given as a DictConfig, a mapping, a dataclass or a plain object."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(init_cfg, DictConfig):
            return dict(OmegaConf.to_container(init_cfg, resolve=True))
    except ImportError:  # omegaconf is a dependency; this only keeps the module importable alone
        pass
    if isinstance(init_cfg, Mapping):
        return dict(init_cfg)
    if dataclasses.is_dataclass(init_cfg):
        return {f.name: getattr(init_cfg, f.name) for f in dataclasses.fields(init_cfg)}
    if hasattr(init_cfg, "__dict__"):
        return {k: v for k, v in vars(init_cfg).items() if not k.startswith("_")}
    raise EmbeddingInitError(f"init config must be a mapping or an object with attributes, got {init_cfg!r}")


def parse_options(strategy: Strategy, items: Mapping[str, Any]) -> Any:
    """The strategy's options dataclass filled from ``items`` (missing or null keys keep defaults)."""
    known = {f.name for s in _STRATEGIES.values() for f in dataclasses.fields(s.options)} | {"name"}
    unknown = sorted(set(items) - known)
    if unknown:
        raise EmbeddingInitError(
            f"init config keys {unknown} belong to no init strategy; "
            f"{strategy.name!r} takes: {', '.join(f.name for f in dataclasses.fields(strategy.options)) or 'no options'}"
        )
    own = {f.name for f in dataclasses.fields(strategy.options)}
    return strategy.options(**{k: v for k, v in items.items() if k in own and v is not None})
