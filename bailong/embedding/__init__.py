"""Initialisation of the embedding and output rows of new tokens, one strategy per module.

    options = init_options("zip_tie", output_rule="first")  # or OmegaConf.to_object(cfg.init) of a composed config
    report = resize_and_initialize(model, base_tokenizer, tokenizer, options, texts=None, seed=0)
    key_inputs = rows_depend_on(options, seed)  # what the rows depend on: the init rows' cache key

Importing this package registers every strategy: random, mean, multivariate, subword_mean,
zip_tie, distill (see ``available_strategies()``), each with its options class as the Hydra ``init`` group
option of its name. A new strategy is a module here (options class, row function, ``@register``) and its
name in the import below.
"""

from bailong.embedding import distill, mean, multivariate, random_init, subword_mean, zip_tie  # noqa: F401  (register)
from bailong.embedding.initialize import global_rng_kept, resize_and_initialize, row_norm_stats, rows_depend_on
from bailong.embedding.pieces import EmbeddingInitError, NewTokens, find_new_tokens
from bailong.embedding.registry import (
    InitContext,
    InitOptions,
    NewRows,
    RowInputs,
    available_strategies,
    get_strategy,
    init_options,
    register,
)

__all__ = [
    "EmbeddingInitError",
    "InitContext",
    "InitOptions",
    "NewRows",
    "NewTokens",
    "RowInputs",
    "available_strategies",
    "find_new_tokens",
    "get_strategy",
    "global_rng_kept",
    "init_options",
    "register",
    "resize_and_initialize",
    "row_norm_stats",
    "rows_depend_on",
]
