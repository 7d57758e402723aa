"""Strategy name -> function that computes the new embedding and output rows.

Each strategy is one function ``fn(ctx: InitContext, options) -> NewRows`` registered with the
dataclass of its options, a subclass of ``InitOptions``. That class is the strategy's only schema and
the only place its defaults are declared: ``register`` also stores it in Hydra's ConfigStore as the
``init`` group option of the same name, so ``init=mean init.steps=3`` fails when Hydra composes the
config, and ``init_options`` refuses a key the strategy does not take when options are built in code.

Each strategy also declares what its rows depend on (``RowInputs``): the options that change them,
whether the run seed does, whether the TC corpus does. Cached rows are keyed on exactly that, so runs
that differ only in what the rows ignore (the seed of ``mean``, the shift options of a piece-rule
``zip_tie``) share one entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

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


@dataclass
class InitOptions:
    """What every strategy's options class holds: ``name``, the strategy (``register`` sets it in the
    stored schema). Subclasses add the strategy's own options with their defaults. Not frozen: a frozen
    dataclass becomes a read-only config node, which no override could set."""

    name: str = MISSING


def option_values(options: InitOptions, schema: type | None = None) -> dict[str, Any]:
    """The values of ``schema``'s fields (default: the options' own class) but ``name``, which a cache key
    holds as the strategy. A narrower ``schema`` keeps a subclass's own options out (distill's, for zip_tie)."""
    fields = dataclasses.fields(schema or options)
    return {f.name: getattr(options, f.name) for f in fields if f.name != "name"}


@dataclass(frozen=True)
class RowInputs:
    """What a strategy's new rows depend on besides the base model and the two tokenizers."""

    options: dict[str, Any]  # the options whose values change the rows
    seed: bool = False  # the run seed changes the rows (a draw, a sample, a document order)
    corpus: bool = False  # the TC training texts change the rows


def every_option(options: InitOptions) -> RowInputs:
    """The default declaration: every option matters, neither the seed nor the corpus does."""
    return RowInputs(option_values(options))


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[InitContext, Any], NewRows]
    options: type
    row_inputs: Callable[[Any], RowInputs] = every_option  # parsed options -> what the rows depend on


_STRATEGIES: dict[str, Strategy] = {}


def register(name: str, options: type, row_inputs: Callable[[Any], RowInputs] = every_option) -> Callable:
    """Decorator: ``@register("mean", MeanOptions)`` over ``fn(ctx, options) -> NewRows``; ``options`` (an
    ``InitOptions`` subclass) becomes the ``init`` group option ``name`` in Hydra's ConfigStore, with ``name``
    set. ``row_inputs(options)`` says what the rows depend on (default: every option, not the seed, not the
    corpus). Declaring too little makes a cache hand out rows computed for other inputs, so a strategy that
    draws or reads text must say so."""
    if not (isinstance(options, type) and issubclass(options, InitOptions) and dataclasses.is_dataclass(options)):
        raise TypeError(f"options of strategy {name!r} must be a dataclass subclassing InitOptions, got {options!r}")

    def add(fn: Callable[[InitContext, Any], NewRows]) -> Callable:
        if name in _STRATEGIES:
            raise ValueError(f"init strategy {name!r} is registered twice")
        _STRATEGIES[name] = Strategy(name, fn, options, row_inputs)
        ConfigStore.instance().store(group="init", name=name, node=options(name=name), provider="bailong")
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


def init_options(name: str, **values: Any) -> InitOptions:
    """The options of strategy ``name`` with ``values`` set (null or absent keys keep their defaults), as Hydra
    would compose ``init=<name> init.<key>=<value>``. A key the strategy does not take is an error, another
    strategy's included: it would change nothing, silently."""
    strategy = get_strategy(name)
    own = [f.name for f in dataclasses.fields(strategy.options)]
    unknown = sorted(set(values) - set(own))
    if unknown:
        takes = ", ".join(k for k in own if k != "name") or "no options"
        raise EmbeddingInitError(f"init config keys {unknown} are not options of {name!r}; it takes: {takes}")
    return strategy.options(**{k: v for k, v in values.items() if k != "name" and v is not None}, name=name)


def strategy_of(options: InitOptions) -> Strategy:
    """The registered strategy whose options ``options`` are (``init=<name>`` composed, or ``init_options``)."""
    if not isinstance(options, InitOptions):
        raise TypeError(f"init options must be an InitOptions dataclass (init_options(name, ...)), got {options!r}")
    strategy = get_strategy(options.name)
    if not isinstance(options, strategy.options):
        raise EmbeddingInitError(
            f"init options of class {type(options).__name__} name strategy {options.name!r}, whose options are "
            f"{strategy.options.__name__}"
        )
    return strategy
