"""One pass of the base model over corpus text, for the rules that estimate from it.

The text is tokenized by the *extended* tokenizer and every new token is spelled out in its base
pieces: the base reads exactly the pieces it knows, and we know where each extended token starts,
i.e. the positions at which the extended model will have to predict. One forward pass per chunk
collects:
- per new token t spelled p1..pk, the chained log-probability log P(p2..pk | context, p1) where t
  occurs ("occurrence"), and for each step j >= 2 the mean of log P(pj | context, p1..pj-1) over
  every position where the prefix p1..pj-1 occurs ("prefix", the fallback for tokens not seen);
- at the positions that predict an extended token, the second moments of the final hidden states h
  (the lm_head's input) and their cross-moment with the absorbed-mass bias -log(1 - A(h)), where
  A(h) = sum_p P(p | h) a_p is the base's probability that the next extended token is a new one
  (a_p: the share of extended tokens starting with base piece p that are new, counted on the text).
Only base rows are used (logits over the base vocabulary): the new rows are not written yet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from bailong.embedding.pieces import EmbeddingInitError, NewTokens

MAX_ABSORBED = 0.99  # caps the absorbed-mass bias at log(100): a context never loses all old tokens


@dataclass
class CorpusStats:
    occurrence_sum: torch.Tensor  # (num_new,) float64: sum over occurrences of log P(p2..pk | ctx, p1)
    occurrence_count: torch.Tensor  # (num_new,) int64
    step_token: torch.Tensor  # (num_steps,) which new token each (prefix -> next piece) step belongs to
    step_sum: torch.Tensor  # (num_steps,) float64: sum of log P(pj | ctx, p1..pj-1) where the prefix occurs
    step_count: torch.Tensor  # (num_steps,) int64
    gram: torch.Tensor  # (hidden, hidden) float64: sum of h h^T over predicting positions
    moment: torch.Tensor  # (hidden,) float64: sum of h
    mass_moment: torch.Tensor  # (hidden,) float64: sum of h * -log(1 - A(h))
    mass_bias_sum: float  # sum of -log(1 - A(h)), for the report
    num_positions: int  # predicting positions in the moments
    num_tokens: int  # base pieces run through the model


def shuffled(texts: list[str], seed: int) -> list[str]:
    """The documents in a seeded random order: a token cap then samples every source of a corpus
    given file by file, not only the first file."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order]


def spelled_stream(tokenizer, texts: list[str], new: NewTokens, max_tokens: int, seed: int):
    """Base ids of the shuffled documents as the extended tokenizer splits them (new tokens spelled
    out), and per position the extended id that starts there (-1 inside a spelled-out token)."""
    ids: list[int] = []
    starts: list[int] = []
    for text in shuffled(texts, seed):
        for token in tokenizer(text)["input_ids"]:
            pieces = new.base_pieces[token - new.num_base] if token >= new.num_base else (token,)
            ids.extend(pieces)
            starts.append(token)
            starts.extend([-1] * (len(pieces) - 1))
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens], starts[:max_tokens]


def absorbed_share(ids: list[int], starts: list[int], num_base: int) -> torch.Tensor:
    """a_p: of the extended tokens whose first base piece is p, the share that are new tokens."""
    first = torch.tensor([i for i, s in zip(ids, starts) if s >= 0], dtype=torch.long)
    is_new = torch.tensor([s >= num_base for s in starts if s >= 0], dtype=torch.float64)
    count = torch.zeros(num_base, dtype=torch.float64).index_add_(0, first, torch.ones_like(is_new))
    absorbed = torch.zeros(num_base, dtype=torch.float64).index_add_(0, first, is_new)
    return absorbed / count.clamp_min(1)


def _step_tables(new: NewTokens):
    """prefix tuple -> (step slots, next piece ids), and the new token of each step."""
    by_prefix: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
    step_token: list[int] = []
    for t, spelled in enumerate(new.base_pieces):
        for j in range(1, len(spelled)):
            slots, nexts = by_prefix.setdefault(tuple(spelled[:j]), ([], []))
            slots.append(len(step_token))
            nexts.append(spelled[j])
            step_token.append(t)
    prefix_tensors = {k: (torch.tensor(s), torch.tensor(n)) for k, (s, n) in by_prefix.items()}
    return prefix_tensors, torch.tensor(step_token, dtype=torch.long)


@torch.no_grad()
def collect_corpus_stats(
    model,
    tokenizer,
    texts: list[str],
    new: NewTokens,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    seed: int = 0,
) -> CorpusStats:
    if not texts:
        raise EmbeddingInitError("this init rule estimates from the TC corpus: pass texts (training documents)")
    ids, starts = spelled_stream(tokenizer, texts, new, max_tokens, seed)
    rows = [(ids[i : i + seq_len], starts[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    rows = [r for r in rows if len(r[0]) >= 2]
    if not rows:
        raise EmbeddingInitError("the corpus texts give fewer than 2 base tokens: nothing to estimate from")

    decoder = model.get_decoder()
    old_head = model.get_output_embeddings().weight.detach()[: new.num_base].float()
    device, hidden = old_head.device, old_head.shape[1]
    share = absorbed_share(ids, starts, new.num_base).to(device)
    by_prefix, step_token = _step_tables(new)
    stats = CorpusStats(
        occurrence_sum=torch.zeros(new.num_new, dtype=torch.float64),
        occurrence_count=torch.zeros(new.num_new, dtype=torch.long),
        step_token=step_token,
        step_sum=torch.zeros(len(step_token), dtype=torch.float64),
        step_count=torch.zeros(len(step_token), dtype=torch.long),
        gram=torch.zeros(hidden, hidden, dtype=torch.float64, device=device),
        moment=torch.zeros(hidden, dtype=torch.float64, device=device),
        mass_moment=torch.zeros(hidden, dtype=torch.float64, device=device),
        mass_bias_sum=0.0,
        num_positions=0,
        num_tokens=len(ids),
    )

    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            width = len(batch[0][0])
            # rows of one batch share a length; the last, shorter row runs on its own
            for group in ([r for r in batch if len(r[0]) == width], [r for r in batch if len(r[0]) != width]):
                if group:
                    _run_group(group, decoder, old_head, share, by_prefix, new, stats)
    finally:
        model.train(was_training)
    for key in ("gram", "moment", "mass_moment"):
        setattr(stats, key, getattr(stats, key).cpu())
    return stats


def _run_group(group, decoder, old_head, share, by_prefix, new: NewTokens, stats: CorpusStats) -> None:
    device = old_head.device
    ids = torch.tensor([r for r, _ in group], device=device)
    h = decoder(input_ids=ids).last_hidden_state.float()
    logits = h @ old_head.T
    logp = torch.log_softmax(logits, dim=-1)
    # positions whose next position starts an extended token: where the extended model predicts
    starts = torch.tensor([s for _, s in group], device=device)
    predicting = torch.zeros_like(starts, dtype=torch.bool)
    predicting[:, :-1] = starts[:, 1:] >= 0
    flat = h[predicting].double()
    absorbed = (logp[predicting].exp() @ share.float()).double().clamp(0, MAX_ABSORBED)
    mass_bias = -torch.log1p(-absorbed)
    stats.gram += flat.T @ flat
    stats.moment += flat.sum(dim=0)
    stats.mass_moment += flat.T @ mass_bias
    stats.mass_bias_sum += mass_bias.sum().item()
    stats.num_positions += flat.shape[0]
    logp = logp.double().cpu()
    for (row, row_starts), lp in zip(group, logp):
        _scan_row(row, row_starts, lp, by_prefix, new, stats)


def _scan_row(row, row_starts, lp, by_prefix, new: NewTokens, stats: CorpusStats) -> None:
    n = len(row)
    next_ids = torch.tensor(row[1:], dtype=torch.long)
    # actual[i] = log P(row[i+1] | row[..i]); cum turns any chained sum into one subtraction
    actual = lp[:-1].gather(1, next_ids[:, None]).squeeze(1)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), actual.cumsum(0)]).tolist()
    for s in range(n):
        token = row_starts[s]
        if token >= new.num_base:  # a new token starts at s: its pieces' chained log-prob after p1
            t = token - new.num_base
            k = len(new.base_pieces[t])
            if k > 1 and s + k <= n:
                stats.occurrence_sum[t] += cum[s + k - 1] - cum[s]
                stats.occurrence_count[t] += 1
        # Grow row[s : s + length] while it is a prefix of some spelling (the prefix set is closed
        # under shortening, so the first miss ends the search from s).
        for length in range(1, n - s + 1):
            hit = by_prefix.get(tuple(row[s : s + length]))
            if hit is None:
                break
            slots, nexts = hit  # predictions made right after the prefix, at position s + length - 1
            stats.step_sum.index_add_(0, slots, lp[s + length - 1, nexts])
            stats.step_count.index_add_(0, slots, torch.ones_like(slots))
