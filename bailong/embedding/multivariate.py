"""``multivariate``: samples from N(mean, scale * covariance) of the existing rows.

transformers' ``mean_resizing`` draws from this distribution with ``scale = 1e-9`` (in effect the
mean plus a tiny jitter); ``covariance_scale: 1.0`` (the default here) is Hewitt's full Gaussian,
which gives new rows the spread of real ones. The covariance is the population one (divided by
the number of rows), as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bailong.embedding.pieces import EmbeddingInitError
from bailong.embedding.registry import InitContext, InitOptions, NewRows, RowInputs, option_values, register


@dataclass
class MultivariateOptions(InitOptions):
    covariance_scale: float = 1.0

    def __post_init__(self):
        if not self.covariance_scale > 0:
            raise EmbeddingInitError(f"multivariate covariance_scale must be > 0, got {self.covariance_scale}")


def gaussian_factor(rows: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, L) in float64 with L @ L.T = scale * covariance of ``rows`` (+ a jitter if singular)."""
    x = rows.double()
    mean = x.mean(dim=0)
    # the O(rows x hidden^2) product in float32 (several times float64's speed on a CPU; 32,000 x 4,096 at
    # Llama-2 shapes), accumulated by BLAS: the covariance differs from float64's at float32 rounding only
    centred = (x - mean).float()
    cov = scale * (centred.T @ centred).double() / x.shape[0]
    jitter = 0.0
    while True:  # fewer rows than dimensions makes the covariance singular: add the smallest jitter that works
        factor, bad = torch.linalg.cholesky_ex(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype))
        if not bad:
            return mean, factor
        jitter = max(jitter * 10, 1e-12 * cov.diagonal().mean().item() or 1e-12)


def sample_rows(rows: torch.Tensor, scale: float, n: int, gen: torch.Generator) -> torch.Tensor:
    mean, factor = gaussian_factor(rows.cpu(), scale)
    z = torch.randn(n, rows.shape[1], generator=gen, dtype=torch.float64)  # the same draws as before
    return (mean + (z.float() @ factor.T.float()).double()).float()  # float32 product: the rows are float32


def multivariate_row_inputs(options: MultivariateOptions) -> RowInputs:
    return RowInputs(option_values(options), seed=True)  # the Gaussian draw is seeded by the run seed


@register("multivariate", MultivariateOptions, multivariate_row_inputs)
def multivariate_rows(ctx: InitContext, options: MultivariateOptions) -> NewRows:
    gen = ctx.generator()
    n = ctx.new.num_new
    embed = sample_rows(ctx.old_embed(), options.covariance_scale, n, gen)
    head = sample_rows(ctx.old_head(), options.covariance_scale, n, gen)
    return NewRows(embed, head, {"covariance_scale": options.covariance_scale})
