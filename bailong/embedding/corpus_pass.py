"""One pass of the base model over base-tokenized corpus text, for rules that estimate from it.

Collects, in a single forward pass per chunk:
- for each new token spelled p1..pk: the chained log-probability log P(p2..pk | context, p1)
  wherever the whole spelling occurs ("occurrence"), and for each step j >= 2 the mean of
  log P(pj | context, p1..pj-1) over every position where the prefix p1..pj-1 occurs ("prefix");
- the second moments of the final hidden states (the lm_head's input), from which the zip_tie
  output rule solves for a direction along which a dot product adds a constant to a logit.
Only base rows are used (logits over the base vocabulary): the new rows are not written yet.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from bailong.embedding.pieces import EmbeddingInitError, NewTokens


@dataclass
class CorpusStats:
    occurrence_sum: torch.Tensor  # (num_new,) float64: sum over occurrences of log P(p2..pk | ctx, p1)
    occurrence_count: torch.Tensor  # (num_new,) int64
    step_token: torch.Tensor  # (num_steps,) which new token each (prefix -> next piece) step belongs to
    step_sum: torch.Tensor  # (num_steps,) float64: sum of log P(pj | ctx, p1..pj-1) where the prefix occurs
    step_count: torch.Tensor  # (num_steps,) int64
    gram: torch.Tensor  # (hidden, hidden) float64: sum of h h^T over positions
    moment: torch.Tensor  # (hidden,) float64: sum of h
    num_positions: int
    num_tokens: int


def shuffled(texts: list[str], seed: int) -> list[str]:
    """The documents in a seeded random order: a token cap then samples every source of a corpus
    given file by file, not only the first file."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order]


def base_token_stream(base_tokenizer, texts: list[str], max_tokens: int, seed: int) -> list[int]:
    """Base ids of the shuffled documents (each with the tokenizer's own special tokens), capped."""
    stream: list[int] = []
    for text in shuffled(texts, seed):
        stream.extend(base_tokenizer(text)["input_ids"])
        if len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


def _step_tables(new: NewTokens):
    """prefix tuple -> (step slots, next piece ids) and spelling tuple -> new-token indices."""
    by_prefix: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
    step_token: list[int] = []
    by_spelling: dict[tuple[int, ...], list[int]] = {}
    for t, spelled in enumerate(new.base_pieces):
        if len(spelled) < 2:
            continue
        by_spelling.setdefault(tuple(spelled), []).append(t)
        for j in range(1, len(spelled)):
            slots, nexts = by_prefix.setdefault(tuple(spelled[:j]), ([], []))
            slots.append(len(step_token))
            nexts.append(spelled[j])
            step_token.append(t)
    prefix_tensors = {k: (torch.tensor(s), torch.tensor(n)) for k, (s, n) in by_prefix.items()}
    return prefix_tensors, by_spelling, torch.tensor(step_token, dtype=torch.long)


@torch.no_grad()
def collect_corpus_stats(
    model, base_tokenizer, texts: list[str], new: NewTokens, seq_len: int, batch_size: int, max_tokens: int,
    seed: int = 0,
) -> CorpusStats:
    if not texts:
        raise EmbeddingInitError("this init rule estimates from the TC corpus: pass texts (training documents)")
    stream = base_token_stream(base_tokenizer, texts, max_tokens, seed)
    rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise EmbeddingInitError("the corpus texts give fewer than 2 base tokens: nothing to estimate from")

    decoder = model.get_decoder()
    head = model.get_output_embeddings().weight
    old_head = head.detach()[: new.num_base].float()
    device = old_head.device
    hidden = old_head.shape[1]
    by_prefix, by_spelling, step_token = _step_tables(new)

    occ_sum = torch.zeros(new.num_new, dtype=torch.float64)
    occ_count = torch.zeros(new.num_new, dtype=torch.long)
    step_sum = torch.zeros(len(step_token), dtype=torch.float64)
    step_count = torch.zeros(len(step_token), dtype=torch.long)
    gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
    moment = torch.zeros(hidden, dtype=torch.float64, device=device)
    positions = 0

    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            # rows of one batch share a length; the last, shorter row runs on its own
            for group in ([r for r in batch if len(r) == len(batch[0])], [r for r in batch if len(r) != len(batch[0])]):
                if not group:
                    continue
                ids = torch.tensor(group, device=device)
                h = decoder(input_ids=ids).last_hidden_state.float()
                flat = h.reshape(-1, hidden).double()
                gram += flat.T @ flat
                moment += flat.sum(dim=0)
                positions += flat.shape[0]
                logp = torch.log_softmax(h @ old_head.T, dim=-1).double().cpu()
                for row, lp in zip(group, logp):
                    _scan_row(row, lp, by_prefix, by_spelling, occ_sum, occ_count, step_sum, step_count)
    finally:
        model.train(was_training)
    return CorpusStats(occ_sum, occ_count, step_token, step_sum, step_count,
                       gram.cpu(), moment.cpu(), positions, len(stream))


def _scan_row(row, lp, by_prefix, by_spelling, occ_sum, occ_count, step_sum, step_count):
    n = len(row)
    next_ids = torch.tensor(row[1:], dtype=torch.long)
    # actual[i] = log P(row[i+1] | row[..i]); cum turns any chained sum into one subtraction
    actual = lp[:-1].gather(1, next_ids[:, None]).squeeze(1)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), actual.cumsum(0)]).tolist()
    for s in range(n):
        # Grow row[s : s + length] while it is a prefix of some spelling (the prefix set is closed
        # under shortening, so the first miss ends the search from s).
        for length in range(1, n - s + 1):
            key = tuple(row[s : s + length])
            for t in by_spelling.get(key, ()):
                occ_sum[t] += cum[s + length - 1] - cum[s]
                occ_count[t] += 1
            hit = by_prefix.get(key)
            if hit is None:
                break
            slots, nexts = hit  # predictions made right after the prefix, at position s + length - 1
            step_sum.index_add_(0, slots, lp[s + length - 1, nexts])
            step_count.index_add_(0, slots, torch.ones_like(slots))
