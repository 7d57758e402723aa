"""``multivariate``: samples from N(mean, scale * covariance) of the existing rows.

transformers' ``mean_resizing`` draws from this distribution with ``scale = 1e-9`` (in effect the
mean plus a tiny jitter); ``covariance_scale: 1.0`` (the default here) is Hewitt's full Gaussian,
which gives new rows the spread of real ones. The covariance is the population one (divided by
the number of rows), as in transformers.
"""

from __future__ import annotations

import functools
import time
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


BLOCKS = 4  # the symmetric and triangular products in 4 x 4 blocks skip 6 of 16 (measured: 15% less time)


def gram(x: torch.Tensor, blocks: int = BLOCKS) -> torch.Tensor:
    """``x.T @ x`` in float32, computing the blocks on and above the diagonal only (the rest is their transpose)."""
    h = x.shape[1]
    edges = [h * b // blocks for b in range(blocks + 1)]
    out = torch.empty(h, h, dtype=torch.float32)
    xt = x.T.contiguous()  # BLAS multiplies a contiguous transpose twice as fast as the strided view
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = (xt[rows] @ x[:, cols]).float()
            out[rows, cols], out[cols, rows] = block, block.T
    return out


def times_lower_transposed(z: torch.Tensor, lower: torch.Tensor, blocks: int = BLOCKS) -> torch.Tensor:
    """``z @ lower.T`` in float32 for a lower-triangular ``lower``, skipping its zero blocks: output column block j
    reads only the first ``edges[j + 1]`` columns of ``z``."""
    n, h = z.shape
    edges = [h * b // blocks for b in range(blocks + 1)]
    out = torch.empty(n, h, dtype=torch.float32)
    upper = lower.T.contiguous()
    for j in range(blocks):
        cols = slice(edges[j], edges[j + 1])
        out[:, cols] = z[:, : edges[j + 1]] @ upper[: edges[j + 1], cols]  # converted to float32 as it is copied
    return out


def gaussian_factor(rows: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32):
    """(mean, L) with L @ L.T = scale * covariance of ``rows`` (+ a jitter if singular).

    The O(rows x hidden^2) product runs in ``dtype`` (float32: the covariance differs from float64's at float32
    rounding only; bfloat16: see ``sample_rows``), the Cholesky factorisation in float64, or in float32 when the
    factor is only going to be rounded to bfloat16."""
    mean = rows.float().mean(dim=0)  # float32's cascaded sum: within 1e-9 of float64's here, 7x faster
    centred = (rows.float() - mean).to(dtype)  # centred in float32, then rounded once
    cov = scale * gram(centred).to(torch.float64 if dtype == torch.float32 else torch.float32) / rows.shape[0]
    jitter = 0.0
    while True:  # fewer rows than dimensions makes the covariance singular: add the smallest jitter that works
        factor, bad = torch.linalg.cholesky_ex(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype))
        if not bad:
            return mean, factor
        jitter = max(jitter * 10, 1e-12 * cov.diagonal().mean().item() or 1e-12)


def sample_rows(
    rows: torch.Tensor, scale: float, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` draws from N(mean, scale * covariance) of ``rows``: ``mean + z @ L.T`` with ``z`` the generator's
    float32 standard normals (the same ``z`` whatever ``dtype``).

    ``dtype`` is the precision of the two large products (covariance, draws). float32 gives the float64 draw to
    float32 rounding. bfloat16 (``fast_product_dtype``: ~5x float32's speed where the hardware has it, the
    difference at Llama-2 shapes between ~40 s and a few) rounds each product's inputs and result to 8 bits of
    mantissa: the rows are then draws from a Gaussian whose covariance is the rows' to that rounding, though not the
    float64 draw's values (where the covariance is ill-conditioned, its Cholesky factor turns with so small a
    change). tests/test_embedding.py measures the draws' mean and covariance in both precisions."""
    mean, factor = gaussian_factor(rows.cpu(), scale, dtype)
    z = torch.randn(n, rows.shape[1], generator=gen, dtype=torch.float32)  # float64 normals take 3x as long to draw
    return times_lower_transposed(z.to(dtype), factor.to(dtype)).add_(mean)


@functools.cache
def fast_product_dtype(hidden: int = 512) -> torch.dtype:
    """bfloat16 where this CPU multiplies bfloat16 matrices at least twice as fast as float32 ones (AVX512-BF16,
    AMX), else float32: measured once on a ``hidden`` x ``hidden`` product, since no torch API says whether the
    CPU has fast bfloat16 kernels (without them torch's bfloat16 matmul is several times *slower* than float32)."""
    a = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0))
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up: the first call pays for kernel selection
        started = time.perf_counter()
        for _ in range(3):
            x @ x
        seconds[dtype] = time.perf_counter() - started
    return torch.bfloat16 if seconds[torch.bfloat16] * 2 <= seconds[torch.float32] else torch.float32


def multivariate_row_inputs(options: MultivariateOptions) -> RowInputs:
    return RowInputs(option_values(options), seed=True)  # the Gaussian draw is seeded by the run seed


@register("multivariate", MultivariateOptions, multivariate_row_inputs)
def multivariate_rows(ctx: InitContext, options: MultivariateOptions) -> NewRows:
    gen = ctx.generator()
    n = ctx.new.num_new
    dtype = fast_product_dtype()
    embed = sample_rows(ctx.old_embed(), options.covariance_scale, n, gen, dtype)
    head = sample_rows(ctx.old_head(), options.covariance_scale, n, gen, dtype)
    info = {"covariance_scale": options.covariance_scale, "product_dtype": str(dtype).removeprefix("torch.")}
    return NewRows(embed, head, info)
