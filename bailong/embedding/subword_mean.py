"""``subword_mean``: each new row is the mean of the rows of the base pieces that spell the token
(FVT, Gee et al. 2022): for a CJK character the base does not hold, its UTF-8 byte pieces."""
from __future__ import annotations

from bailong.embedding.pieces import compose_rows
from bailong.embedding.registry import InitContext, NewRows, register


@register("subword_mean")
def subword_mean_rows(ctx: InitContext, options) -> NewRows:
    spelled = ctx.new.base_pieces
    return NewRows(compose_rows(ctx.old_embed(), spelled, "mean"), compose_rows(ctx.old_head(), spelled, "mean"))
