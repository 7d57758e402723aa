"""Resize a base model to the extended vocabulary and write every new row by the chosen strategy.

Runs on the full-precision model, before quantisation. ``mean_resizing`` is off: transformers'
own fill of the new rows is overwritten here, by explicit token id, for both the input embedding
and the (untied, as in Llama 2) output head. Old rows are copied by ``resize_token_embeddings``
and never written again.

The global RNGs (torch, Python's ``random``, NumPy) are left as they were found: whatever runs after
the initialisation — LoRA's init, the data order — starts from the same state whether the rows were
computed or read from a cache.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from bailong.embedding.pieces import EmbeddingInitError, find_new_tokens
from bailong.embedding.registry import InitContext, InitOptions, strategy_of


def row_norm_stats(rows: torch.Tensor) -> dict[str, float]:
    """Mean/std/min/max of the rows' L2 norms (JSON-able; all zeros for no rows)."""
    if rows.shape[0] == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    norms = rows.detach().float().norm(dim=1)
    std = norms.std().item() if norms.numel() > 1 else 0.0
    return {"mean": norms.mean().item(), "std": std, "min": norms.min().item(), "max": norms.max().item()}


@contextmanager
def global_rng_kept(device: torch.device | str = "cpu") -> Iterator[None]:
    """Restore the global RNGs on exit: torch's CPU generator (and ``device``'s, for a CUDA device),
    Python's ``random`` and NumPy's. Resizing draws from torch's even under ``no_init_weights`` (the new
    ``nn.Embedding``/``nn.Linear`` initialise themselves); a cached run skips the resize, so without this
    a run's LoRA init and data order would depend on whether its rows were cached."""
    device = torch.device(device)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def rows_depend_on(options: InitOptions, seed: int) -> dict[str, Any]:
    """What the new rows depend on besides the base model and the two tokenizers, as JSON for a cache key:
    the strategy, the options that change its rows, the seed (``None`` if it changes nothing) and whether
    the TC corpus does."""
    strategy = strategy_of(options)
    inputs = strategy.row_inputs(options)
    return {
        "strategy": strategy.name,
        "options": inputs.options,
        "seed": seed if inputs.seed else None,
        "corpus": inputs.corpus,
    }


def _is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def resize_and_initialize(model, base_tokenizer, tokenizer, options: InitOptions, texts=None, seed: int = 0) -> dict:
    """Resize ``model`` to ``len(tokenizer)`` and initialise the new rows; return a JSON-able report.

    ``options`` are a registered strategy's options (``init=<name>`` composed, or ``init_options(name, ...)``);
    ``texts`` are TC training documents for strategies that estimate from the corpus (zip_tie shift, distill).
    The global RNGs are left as they were (``global_rng_kept``). The report's ``options`` and ``seed`` are
    those the rows depend on (``rows_depend_on``): a cached report is true of every run that shares it.
    """
    # imported here: this package is imported with bailong.config (it registers the init configs), and
    # transformers would add half a second to every config composition
    from bailong.model.build import resize_rows

    depends_on = rows_depend_on(options, seed)
    strategy = strategy_of(options)
    new = find_new_tokens(base_tokenizer, tokenizer)

    embed = model.get_input_embeddings()
    if embed.num_embeddings != new.num_base:
        raise EmbeddingInitError(
            f"model has {embed.num_embeddings} embedding rows but the base tokenizer has {new.num_base} "
            "tokens: pass the base model that goes with the base tokenizer, not yet resized"
        )
    tied = _is_tied(model)
    before = {"embed": row_norm_stats(embed.weight[: new.num_base])}
    if not tied:
        before["head"] = row_norm_stats(model.get_output_embeddings().weight[: new.num_base])

    start = time.perf_counter()
    # resize_rows computes nothing for the new rows (the strategy writes every one of them below);
    # global_rng_kept: what a strategy draws from the global RNGs is undone
    with global_rng_kept(embed.weight.device):
        resize_rows(model, len(tokenizer))
        info: dict[str, Any] = {}
        if new.num_new:
            ctx = InitContext(model, base_tokenizer, tokenizer, new, list(texts) if texts is not None else None, seed)
            rows = strategy.fn(ctx, options)
            _write_rows(model, new.num_base, rows.embed, rows.head, tied)
            info = rows.info
    seconds = time.perf_counter() - start

    weight = model.get_input_embeddings().weight
    after = {"embed": row_norm_stats(weight[new.num_base :])}
    if not tied:
        after["head"] = row_norm_stats(model.get_output_embeddings().weight[new.num_base :])
    return {
        "strategy": strategy.name,
        "options": depends_on["options"],
        "seed": depends_on["seed"],
        "num_base": new.num_base,
        "num_new": new.num_new,
        "vocab_size": len(tokenizer),
        "tied_embeddings": tied,
        "pieces_per_new_token": new.piece_count_histogram(),
        "row_norms_old": before,
        "row_norms_new": after,
        "seconds": round(seconds, 3),
        "info": info,
    }


@torch.no_grad()
def _write_rows(model, num_base: int, embed_rows: torch.Tensor, head_rows: torch.Tensor, tied: bool) -> None:
    """Check a strategy's rows, then write them with bailong.model.build's ``write_rows`` (the one row writer;
    imported here for the reason resize_and_initialize gives)."""
    from bailong.model.build import write_rows

    weight = model.get_input_embeddings().weight
    expected = (weight.shape[0] - num_base, weight.shape[1])
    for what, rows in (("embed", embed_rows), ("head", head_rows)):
        if tuple(rows.shape) != expected:
            raise EmbeddingInitError(f"strategy returned {what} rows of shape {tuple(rows.shape)}, expected {expected}")
        # the extremes are NaN or infinite exactly when some value is: one pass, no boolean copy of the rows
        if not all(torch.isfinite(v) for v in torch.aminmax(rows)):
            raise EmbeddingInitError(f"strategy returned non-finite {what} rows")
    # tied: the head *is* the embedding, so the output rule has nothing to write
    write_rows(model, num_base, {"embed": embed_rows} if tied else {"embed": embed_rows, "head": head_rows})
