"""``subword_mean``: each new row is the mean of the rows of the base pieces that spell the token
(FVT, Gee et al. 2022): for a CJK character the base does not hold, its UTF-8 byte pieces."""

from __future__ import annotations

from dataclasses import dataclass

from bailong.embedding.pieces import compose_rows
from bailong.embedding.registry import InitContext, InitOptions, NewRows, register


@dataclass
class SubwordMeanOptions(InitOptions):
    """``subword_mean`` takes no options."""


@register("subword_mean", SubwordMeanOptions)
def subword_mean_rows(ctx: InitContext, options: InitOptions) -> NewRows:
    spelled = ctx.new.base_pieces
    return NewRows(compose_rows(ctx.old_embed(), spelled, "mean"), compose_rows(ctx.old_head(), spelled, "mean"))
