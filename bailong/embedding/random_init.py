"""``random``: the model's own initializer, normal(0, config.initializer_range), for embed and head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bailong.embedding.pieces import EmbeddingInitError
from bailong.embedding.registry import InitContext, InitOptions, NewRows, RowInputs, option_values, register


@dataclass
class RandomOptions(InitOptions):
    std: float | None = None  # None: the model config's initializer_range (0.02 for Llama 2)

    def __post_init__(self):
        if self.std is not None and not self.std > 0:
            raise EmbeddingInitError(f"random init std must be > 0, got {self.std}")


def random_row_inputs(options: RandomOptions) -> RowInputs:
    """The draw depends on the seed (``std: null`` resolves from the model config, part of the model's key)."""
    return RowInputs(option_values(options), seed=True)


@register("random", RandomOptions, random_row_inputs)
def random_rows(ctx: InitContext, options: RandomOptions) -> NewRows:
    std = options.std if options.std is not None else ctx.model.config.initializer_range
    shape = (ctx.new.num_new, ctx.embed_weight.shape[1])
    gen = ctx.generator()
    # Embed rows first, then head rows, from one seeded generator: the draw is reproducible.
    embed = torch.normal(0.0, std, shape, generator=gen)
    head = torch.normal(0.0, std, shape, generator=gen)
    return NewRows(embed, head, {"std": std})
