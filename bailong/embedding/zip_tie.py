"""``zip_tie``: a new TC token starts from the base pieces it zips together (the Bailong method).

The paper says the new token is initialised from its byte-level counterparts; the exact formula
is not in the material we have, so the input rule and the output rule are separate options
(see docs/zip_tie.md for which one measured best and why):

- piece rules, for input and output rows: ``mean``, ``first``, ``last``, ``weighted_first``,
  ``weighted_last`` (linear position weights, see ``pieces.piece_weights``);
- ``first_shift`` (output only): the first piece's head row plus ``c_t * delta``, so that the new
  token's logit is about logit(p1) + log P(p2..pk | context, p1) = the base's log-probability of
  the whole spelling. ``c_t`` is estimated by running the base on the corpus; ``delta`` is the
  ridge least-squares solution of delta . h = 1 over the corpus' final hidden states h, the
  direction along which a row change adds a constant to the logit. With ``absorbed_mass_bias``
  every new row also gets gamma, fitted so gamma . h ~ -log(1 - A(h)) (see corpus_pass): the old
  first pieces keep the probability the new tokens now also claim, and raising the new tokens by
  that much is what maximises the likelihood of text where a share A(h) of tokens is new.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bailong.embedding.corpus_pass import CorpusStats, collect_corpus_stats
from bailong.embedding.pieces import PIECE_RULES, EmbeddingInitError, compose_rows
from bailong.embedding.registry import InitContext, InitOptions, NewRows, RowInputs, option_values, register

OUTPUT_RULES = PIECE_RULES + ("first_shift",)
SHIFT_ESTIMATES = ("occurrence", "prefix")


@dataclass
class ZipTieOptions(InitOptions):
    input_rule: str = "last"
    output_rule: str = "first_shift"
    # prefix: sum over steps j of the mean log P(pj | ctx, p1..pj-1) wherever that prefix occurs, so
    # the new tokens sharing p1 claim about the share of p1's mass that continues into them (what the
    # absorbed-mass bias assumes); occurrence: the mean chained log-prob only where the token occurs
    # (higher: it conditions on the outcome), else the prefix estimate. Never seen: the corpus-wide mean.
    shift_estimate: str = "prefix"
    # added to every shift: exp(mean log p) underestimates the mean p (Jensen), so the estimated
    # shifts give the new tokens too little mass; 0.5 measured best (docs/zip_tie.md)
    shift_bias: float = 0.5
    # add gamma with gamma . h ~ -log(1 - A(h)) to every new row: the new tokens duplicate the mass
    # A(h) that the old first pieces keep, and this is the bias that maximises likelihood then
    absorbed_mass_bias: bool = True
    shift_ridge: float = 1e-3  # ridge for delta, relative to the mean squared hidden coordinate
    shift_max_tokens: int = 400_000  # base pieces of corpus text to run the base on
    shift_seq_len: int = 512
    shift_batch_size: int = 8

    def __post_init__(self):
        if self.input_rule not in PIECE_RULES:
            raise EmbeddingInitError(
                f"zip_tie input_rule {self.input_rule!r}: expected one of {', '.join(PIECE_RULES)}"
            )
        if self.output_rule not in OUTPUT_RULES:
            raise EmbeddingInitError(
                f"zip_tie output_rule {self.output_rule!r}: expected one of {', '.join(OUTPUT_RULES)}"
            )
        if self.shift_estimate not in SHIFT_ESTIMATES:
            raise EmbeddingInitError(
                f"zip_tie shift_estimate {self.shift_estimate!r}: expected one of {', '.join(SHIFT_ESTIMATES)}"
            )
        for key in ("shift_max_tokens", "shift_seq_len", "shift_batch_size"):
            if getattr(self, key) < 1:
                raise EmbeddingInitError(f"zip_tie {key} must be >= 1, got {getattr(self, key)}")
        if self.shift_seq_len < 2:
            raise EmbeddingInitError(f"zip_tie shift_seq_len must be >= 2, got {self.shift_seq_len}")
        if self.shift_ridge < 0:
            raise EmbeddingInitError(f"zip_tie shift_ridge must be >= 0, got {self.shift_ridge}")


def ridge_direction(stats: CorpusStats, target_moment: torch.Tensor, ridge: float) -> torch.Tensor:
    """x minimising mean (x . h - y)^2 + ridge * mean(h_i^2) * |x|^2 over the corpus' predicting
    positions, given target_moment = sum of h * y."""
    second = stats.gram / stats.num_positions
    scale = second.diagonal().mean()
    eye = torch.eye(second.shape[0], dtype=second.dtype)
    return torch.linalg.solve(second + ridge * scale * eye, target_moment / stats.num_positions)


def constant_direction(stats: CorpusStats, ridge: float) -> tuple[torch.Tensor, float]:
    """delta with delta . h ~ 1 on the corpus, and the fit's RMS error."""
    delta = ridge_direction(stats, stats.moment, ridge)
    second, first = stats.gram / stats.num_positions, stats.moment / stats.num_positions
    mse = (delta @ second @ delta - 2 * delta @ first + 1).clamp_min(0).item()
    return delta, mse**0.5


def continuation_logprobs(stats: CorpusStats, num_pieces: list[int], estimate: str) -> tuple[torch.Tensor, dict]:
    """Per new token, the estimated log P(p2..pk | context, p1) and how many came from each source."""
    num_new = len(num_pieces)
    k = torch.tensor(num_pieces, dtype=torch.float64)
    seen = stats.step_count > 0
    default_step = (stats.step_sum[seen].sum() / stats.step_count[seen].sum()).item() if seen.any() else 0.0
    step_mean = torch.where(seen, stats.step_sum / stats.step_count.clamp_min(1), torch.zeros_like(stats.step_sum))
    prefix = torch.zeros(num_new, dtype=torch.float64).index_add_(0, stats.step_token, step_mean)
    unseen_steps = torch.zeros(num_new, dtype=torch.long).index_add_(0, stats.step_token, (~seen).long())
    prefix_ok = unseen_steps == 0
    occurrence = stats.occurrence_sum / stats.occurrence_count.clamp_min(1)
    occurrence_ok = stats.occurrence_count > 0

    multi = k > 1
    use_occurrence = occurrence_ok & multi if estimate == "occurrence" else torch.zeros_like(multi)
    use_prefix = prefix_ok & multi & ~use_occurrence
    # last resort: (k - 1) times the corpus-wide mean log-prob of a continuation piece
    shift = (k - 1) * default_step
    shift = torch.where(use_prefix, prefix, shift)
    shift = torch.where(use_occurrence, occurrence, shift)
    shift = torch.where(multi, shift, torch.zeros_like(shift))
    sources = {
        "single_piece": int((~multi).sum()),
        "occurrence": int(use_occurrence.sum()),
        "prefix": int(use_prefix.sum()),
        "default": int((multi & ~use_occurrence & ~use_prefix).sum()),
        "default_step_logprob": default_step,
    }
    return shift, sources


def shifted_first_rows(ctx: InitContext, options: ZipTieOptions) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    stats = collect_corpus_stats(
        ctx.model,
        ctx.tokenizer,
        ctx.texts or [],
        ctx.new,
        options.shift_seq_len,
        options.shift_batch_size,
        options.shift_max_tokens,
        ctx.seed,
    )
    delta, fit_rms = constant_direction(stats, options.shift_ridge)
    shift, sources = continuation_logprobs(stats, [len(s) for s in ctx.new.base_pieces], options.shift_estimate)
    shift = shift + options.shift_bias
    rows = compose_rows(ctx.old_head(), ctx.new.base_pieces, "first").double()
    rows += shift[:, None] * delta[None, :].to(rows.device)
    info = {
        "corpus_tokens": stats.num_tokens,
        "predicting_positions": stats.num_positions,
        "shift_sources": sources,
        "shift_mean": shift.mean().item(),
        "shift_min": shift.min().item(),
        "shift_max": shift.max().item(),
        "constant_direction_fit_rms": fit_rms,
        "constant_direction_norm": delta.norm().item(),
        "absorbed_mass_bias_mean": stats.mass_bias_sum / stats.num_positions,
    }
    if options.absorbed_mass_bias:
        gamma = ridge_direction(stats, stats.mass_moment, options.shift_ridge)
        rows += gamma[None, :].to(rows.device)
        info["absorbed_mass_direction_norm"] = gamma.norm().item()
    info["corpus_pass_seconds"] = round(time.perf_counter() - start, 3)
    return rows.float(), info


def zip_tie_rows(ctx: InitContext, options: ZipTieOptions) -> NewRows:
    embed = compose_rows(ctx.old_embed(), ctx.new.base_pieces, options.input_rule)
    info: dict = {"input_rule": options.input_rule, "output_rule": options.output_rule}
    if options.output_rule == "first_shift":
        head, shift_info = shifted_first_rows(ctx, options)
        info.update(shift_info)
    else:
        head = compose_rows(ctx.old_head(), ctx.new.base_pieces, options.output_rule)
    return NewRows(embed, head, info)


def zip_tie_row_inputs(options: ZipTieOptions) -> RowInputs:
    """Piece rules read only the base rows. ``first_shift`` runs the base over the corpus in the seeded
    document order: the order decides which text shares a chunk (the context every position sees), so the
    seed changes the rows even when the whole corpus fits under ``shift_max_tokens``."""
    if options.output_rule == "first_shift":
        return RowInputs(option_values(options, ZipTieOptions), seed=True, corpus=True)  # not distill's own
    return RowInputs({"input_rule": options.input_rule, "output_rule": options.output_rule})


register("zip_tie", ZipTieOptions, zip_tie_row_inputs)(zip_tie_rows)
