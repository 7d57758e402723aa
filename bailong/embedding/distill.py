"""``distill``: learn the new rows so the extended model reproduces the base on the same text.

Token distillation (Dobler et al. 2025), with the base model as its own teacher: a context from
the corpus, tokenized with the extended tokenizer, is fed to the student (new ids, rows being
learnt); the same context with every new token spelled out in its base pieces is fed to the
teacher (base ids only, so the teacher is the same frozen model). Two losses, at each student
position aligned with the teacher position that ends on the same character:
- hidden: mean squared difference of the final hidden states, relative to the teacher's mean
  square (drives the input rows: the model should read a new token as it read its pieces);
- output (default ``none``: the output rows stay as zip_tie's first_shift wrote them, which
  measured best); ``match``: squared difference between the student's log-probability of the
  actual next token and the teacher's log-probability of that token's piece sequence; ``ce``:
  plain next-token cross-entropy. Both also train the output rows.
Everything but the new rows is frozen; cost is bounded by steps x batch_size x context_len.
Rows start from zip_tie (its options apply) or subword_mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bailong.embedding.corpus_pass import shuffled
from bailong.embedding.pieces import EmbeddingInitError
from bailong.embedding.registry import InitContext, NewRows, RowInputs, option_values, register
from bailong.embedding.subword_mean import subword_mean_rows
from bailong.embedding.zip_tie import ZipTieOptions, zip_tie_row_inputs, zip_tie_rows

OUTPUT_LOSSES = ("match", "ce", "none")


@dataclass
class DistillOptions(ZipTieOptions):
    start_from: str = "zip_tie"  # zip_tie (with the zip_tie keys above) or subword_mean
    steps: int = 200
    lr: float = 3e-3
    contexts_per_token: int = 4  # occurrences sampled per new token
    context_len: int = 32  # student tokens per context
    batch_size: int = 16  # contexts per step
    output_loss: str = "none"  # none: keep the starting output rows (zip_tie first_shift measured best) | match | ce
    hidden_loss_weight: float = 1.0
    max_corpus_tokens: int = 1_000_000  # extended-tokenizer tokens searched for occurrences

    def __post_init__(self):
        super().__post_init__()
        if self.start_from not in ("zip_tie", "subword_mean"):
            raise EmbeddingInitError(f"distill start_from {self.start_from!r}: expected zip_tie or subword_mean")
        if self.output_loss not in OUTPUT_LOSSES:
            raise EmbeddingInitError(
                f"distill output_loss {self.output_loss!r}: expected one of {', '.join(OUTPUT_LOSSES)}"
            )
        for key in ("contexts_per_token", "batch_size", "max_corpus_tokens"):
            if getattr(self, key) < 1:
                raise EmbeddingInitError(f"distill {key} must be >= 1, got {getattr(self, key)}")
        if self.steps < 0 or not self.lr > 0 or self.context_len < 2 or self.hidden_loss_weight < 0:
            raise EmbeddingInitError(
                f"distill needs steps >= 0, lr > 0, context_len >= 2, hidden_loss_weight >= 0; got steps={self.steps}, "
                f"lr={self.lr}, context_len={self.context_len}, hidden_loss_weight={self.hidden_loss_weight}"
            )


def sample_contexts(ctx: InitContext, options: DistillOptions, gen: torch.Generator) -> list[list[int]]:
    """Windows of extended-tokenizer ids around up to ``contexts_per_token`` occurrences of each new token."""
    stream: list[int] = []
    for text in shuffled(ctx.texts or [], ctx.seed):
        stream.extend(ctx.tokenizer(text)["input_ids"])
        if len(stream) >= options.max_corpus_tokens:
            break
    stream = stream[: options.max_corpus_tokens]
    ids = torch.tensor(stream, dtype=torch.long)
    where = torch.nonzero(ids >= ctx.num_base).squeeze(1)
    if where.numel() == 0:
        return []
    # Group occurrences by token, then keep a seeded random sample of each group.
    order = torch.argsort(ids[where], stable=True)
    where, tokens = where[order], ids[where][order]
    starts = torch.searchsorted(tokens, torch.unique_consecutive(tokens))
    ends = torch.cat([starts[1:], torch.tensor([len(tokens)])])
    after = options.context_len // 4  # keep some tokens after the occurrence: they read it
    windows = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        picks = where[a:b][torch.randperm(b - a, generator=gen)[: options.contexts_per_token]]
        for pos in picks.tolist():
            start = max(0, min(pos - (options.context_len - 1 - after), len(stream) - options.context_len))
            windows.append(stream[start : start + options.context_len])
    return windows


def spell_out(window: list[int], num_base: int, base_pieces: list[list[int]]) -> tuple[list[int], list[int]]:
    """Teacher ids (new tokens replaced by their pieces) and, per student position, the teacher
    position of its last piece."""
    teacher, ends = [], []
    for i in window:
        teacher.extend(base_pieces[i - num_base] if i >= num_base else (i,))
        ends.append(len(teacher) - 1)
    return teacher, ends


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


def distill_row_inputs(options: DistillOptions) -> RowInputs:
    """Training samples contexts and batches with the seed from the corpus; with no steps the rows are the
    starting rule's, and depend on what that rule's rows depend on."""
    if options.steps > 0:
        return RowInputs(option_values(options), seed=True, corpus=True)
    if options.start_from == "zip_tie":
        start = zip_tie_row_inputs(options)
        return RowInputs({"start_from": "zip_tie", "steps": 0, **start.options}, start.seed, start.corpus)
    return RowInputs({"start_from": "subword_mean", "steps": 0})


@register("distill", DistillOptions, distill_row_inputs)
def distill_rows(ctx: InitContext, options: DistillOptions) -> NewRows:
    if not ctx.texts:
        raise EmbeddingInitError("distill learns from the TC corpus: pass texts (training documents)")
    start_rows = zip_tie_rows(ctx, options) if options.start_from == "zip_tie" else subword_mean_rows(ctx, options)
    gen = ctx.generator()
    windows = sample_contexts(ctx, options, gen)
    info = {"start_from": options.start_from, "init_info": start_rows.info, "contexts": len(windows)}
    if not windows or options.steps == 0:
        return NewRows(start_rows.embed, start_rows.head, info)

    start = time.perf_counter()
    model, num_base = ctx.model, ctx.num_base
    device = ctx.embed_weight.device
    dtype = ctx.embed_weight.dtype
    old_embed, old_head = ctx.old_embed(), ctx.old_head().float()
    new_in = torch.nn.Parameter(start_rows.embed.to(device).clone())
    new_out = torch.nn.Parameter(start_rows.head.to(device).clone())
    optimizer = torch.optim.Adam([new_in, new_out], lr=options.lr)
    decoder = model.get_decoder()

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    losses = []
    # one fixed batch scored before and after: batch losses alone are too noisy to show progress
    fixed = windows[: options.batch_size]
    args = (num_base, ctx.new.base_pieces, decoder, old_embed, old_head, new_in, new_out, dtype, device, options)
    try:
        with torch.no_grad():
            fixed_before = _distill_loss(fixed, *args).item()
        with torch.enable_grad():  # callers may run under no_grad
            for _ in range(options.steps):
                picks = torch.randint(len(windows), (options.batch_size,), generator=gen).tolist()
                loss = _distill_loss([windows[i] for i in picks], *args)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        with torch.no_grad():
            fixed_after = _distill_loss(fixed, *args).item()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    info.update(
        {
            "fixed_batch_loss_before": fixed_before,
            "fixed_batch_loss_after": fixed_after,
            "loss_first": losses[0],
            "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]),
            "tokens_with_contexts": len({t for w in windows for t in w if t >= num_base}),
            "train_seconds": round(time.perf_counter() - start, 3),
        }
    )
    return NewRows(new_in.detach().float().cpu(), new_out.detach().float().cpu(), info)


def _distill_loss(batch, num_base, base_pieces, decoder, old_embed, old_head, new_in, new_out, dtype, device, options):
    spelled = [spell_out(w, num_base, base_pieces) for w in batch]
    student_ids, student_mask = _pad(batch)
    teacher_ids, teacher_mask = _pad([t for t, _ in spelled])
    student_ids, student_mask = student_ids.to(device), student_mask.to(device)
    teacher_ids, teacher_mask = teacher_ids.to(device), teacher_mask.to(device)
    align = torch.zeros_like(student_ids)
    for r, (_, ends) in enumerate(spelled):
        align[r, : len(ends)] = torch.tensor(ends, device=device)

    with torch.no_grad():
        h_teacher = decoder(input_ids=teacher_ids, attention_mask=teacher_mask).last_hidden_state.float()
        teacher_logp = torch.log_softmax(h_teacher @ old_head.T, dim=-1)
        # log P(next teacher id | prefix), chained by a cumulative sum over teacher positions
        nxt = teacher_logp[:, :-1].gather(2, teacher_ids[:, 1:, None]).squeeze(2) * teacher_mask[:, 1:]
        cum = torch.cat([torch.zeros_like(nxt[:, :1]), nxt.cumsum(1)], dim=1)

    is_new = student_ids >= num_base
    embeds = old_embed[student_ids.clamp(max=num_base - 1)].float()
    embeds = torch.where(is_new[..., None], new_in[(student_ids - num_base).clamp(min=0)], embeds)
    h_student = decoder(inputs_embeds=embeds.to(dtype), attention_mask=student_mask).last_hidden_state.float()

    valid = student_mask.bool()
    target = h_teacher.gather(1, align[..., None].expand(-1, -1, h_teacher.shape[-1]))
    # positions before a row's first new token see identical inputs: no signal, so leave them out
    after_new = is_new.long().cumsum(1) > 0
    hidden_mask = (valid & after_new).float()
    scale = (target.pow(2).mean(-1) * hidden_mask).sum() / hidden_mask.sum().clamp_min(1)
    per_pos = (h_student - target).pow(2).mean(-1)
    hidden_loss = (per_pos * hidden_mask).sum() / hidden_mask.sum().clamp_min(1) / scale.clamp_min(1e-12)
    loss = options.hidden_loss_weight * hidden_loss
    if options.output_loss == "none":
        return loss

    logits = torch.cat([h_student @ old_head.T, h_student @ new_out.T], dim=-1)
    student_logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, student_ids[:, 1:, None]).squeeze(2)
    pred_mask = (valid[:, 1:] & valid[:, :-1]).float()
    if options.output_loss == "ce":
        out_loss = -(student_logp * pred_mask).sum() / pred_mask.sum()
    else:
        teacher_seq = cum.gather(1, align[:, 1:]) - cum.gather(1, align[:, :-1])
        out_loss = ((student_logp - teacher_seq).pow(2) * pred_mask).sum() / pred_mask.sum()
    return loss + out_loss
