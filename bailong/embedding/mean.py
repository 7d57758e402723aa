"""``mean``: every new row is the mean of all existing rows (Hewitt 2021), for embed and head.

At step 0 a mean output row gives each new token a logit near the average logit, so it takes
little probability mass from the base's predictions (the KL bound in Hewitt's note).
"""

from __future__ import annotations

from dataclasses import dataclass

from bailong.embedding.registry import InitContext, InitOptions, NewRows, register


@dataclass
class MeanOptions(InitOptions):
    """``mean`` takes no options."""


@register("mean", MeanOptions)
def mean_rows(ctx: InitContext, options: MeanOptions) -> NewRows:
    n = ctx.new.num_new
    embed = ctx.old_embed().double().mean(dim=0).float()
    head = ctx.old_head().double().mean(dim=0).float()
    return NewRows(embed.expand(n, -1).clone(), head.expand(n, -1).clone())
