"""Causal-LM cross-entropy without full-vocabulary logits.

transformers' ``model(input_ids, labels=...)`` builds ``[batch, seq, vocab]`` float32 logits, a
shifted copy and a log-softmax of the same size, and keeps them for the backward pass: at Llama-2's
vocabulary extended to 59k pieces that is ~0.5 GB per 2,048 tokens, more than the rest of a QLoRA
step's activations. Here the decoder runs once for hidden states and only the scored positions go
through the head, ``logit_budget`` logits at a time:

- the head as peft leaves it (a frozen ``nn.Linear``, peft's trainable-token rows, or a
  ``modules_to_save`` copy): a fused linear + cross-entropy computes each chunk's logits once and
  turns them straight into the gradients of the hidden states and of the *trainable* rows only
  (peft's own path writes the rows into a copy of the whole head each step, builds the full-vocabulary
  weight gradient and then keeps the new rows of it). The matmuls run in autocast's dtype where autocast
  is on (``trainer.precision=bf16-mixed``: bfloat16, the head cast once per step, not per chunk), else in
  the head's own; logits, softmax, the loss and the trained rows' gradient sum are float32;
- any other head (LoRA on lm_head): each chunk runs through the module under activation
  checkpointing, so backward recomputes that chunk's logits instead of storing them.

Both give the mean over scored tokens that transformers' loss computes, and its gradients
(``tests/test_chunked_loss.py``). The input side does the same for peft's trainable rows of the embedding
(``input_embeddings``): they are looked up apart from the frozen matrix, never merged into a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bailong.data.windows import IGNORE_INDEX
from bailong.model.build import scored_vocab, transformers_model

TRAIN_LOGIT_BUDGET = 2**24  # logits alive at once in a training step (64 MB in float32)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output head of a transformers causal LM, peft-wrapped or not.

    The head is the module the model itself calls, so peft's trainable-token rows, ``modules_to_save``
    copies or LoRA on lm_head all take part exactly as in ``model(...)``.
    """
    base = transformers_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output head: not a causal LM")
    return base.get_decoder(), head


@dataclass
class HeadWeights:
    """What the head multiplies by: ``weight``, the stored matrix without grad (peft's trainable rows *not*
    written in), and the parameter that trains, ``rows``, standing for ``weight[ids]`` (``ids=None``: the
    whole matrix, and ``weight`` is ``rows`` detached)."""

    weight: torch.Tensor
    rows: torch.Tensor | None
    ids: torch.Tensor | None


def head_weights(head: torch.nn.Module) -> HeadWeights | None:
    """The weights of a bias-free linear head (or of a plain input embedding: ``input_embeddings``) as peft's
    forward would use them; ``None`` for modules the fused loss does not know (LoRA on lm_head, several active
    adapters, a bias)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    if isinstance(head, (ModulesToSaveWrapper, TrainableTokensWrapper)):
        active = list(head.active_adapters)
        if head.disable_adapters or not active or any(a not in head._adapters for a in active):
            return head_weights(head.original_module)
        if len(active) != 1:
            return None
        inner = head.modules_to_save[active[0]] if isinstance(head, ModulesToSaveWrapper) else head.token_adapter
        return head_weights(inner)
    if isinstance(head, TrainableTokensLayer):
        active = list(head.active_adapters)
        if head.merged or head.disable_adapters or not active:
            return head_weights(head.base_layer)
        base = head_weights(head.base_layer)
        if len(active) != 1 or base is None or base.rows is not None:
            return None
        ids = torch.tensor(head.token_indices[active[0]], device=base.weight.device)
        return HeadWeights(base.weight, head.trainable_tokens_delta[active[0]], ids)
    if (type(head) is torch.nn.Linear and head.bias is None) or _plain_embedding(head):
        w = head.weight
        return HeadWeights(w.detach(), w, None) if w.requires_grad else HeadWeights(w, None, None)
    return None


def _plain_embedding(module: torch.nn.Module) -> bool:
    """An ``nn.Embedding`` whose lookup is ``weight[ids]`` and nothing more (no scale, norm clipping or sparsity)."""
    return (
        type(module) is torch.nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


def input_embeddings(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """What the model's input embedding returns for ``input_ids`` when peft trains appended rows of it
    (``lora.embeddings=new_rows``), or ``None`` for any other embedding (the decoder then embeds as usual).

    Why: peft's forward writes the trainable rows into a copy of the whole matrix every step and looks the
    ids up in that copy, so backward builds a gradient for every row of the vocabulary and keeps the new ones
    (at 48k x 1,024, two 0.1-0.2 GB passes a step on top of the lookup; 59k x 4,096 at Llama-2's shape). Here
    the frozen matrix and the trainable rows are looked up apart and the new ids take the rows' values: the
    same numbers, and a gradient only for the rows."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    embed = transformers_model(model).get_input_embeddings()
    layer = getattr(embed, "token_adapter", embed)
    if not isinstance(layer, TrainableTokensLayer) or layer._get_embed_scale() is not None:
        return None
    weights = head_weights(embed)
    if weights is None or weights.rows is None or weights.ids is None or not _consecutive(weights.ids):
        return None
    first, n = int(weights.ids[0]), len(weights.ids)
    frozen = F.embedding(input_ids, weights.weight)  # the new ids' own rows here are stale: replaced below
    rows = F.embedding((input_ids - first).clamp(0, n - 1), weights.rows).to(frozen.dtype)  # as peft merges them
    is_new = (input_ids >= first) & (input_ids < first + n)
    return torch.where(is_new.unsqueeze(-1), rows, frozen)


def matmul_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype the head multiplies in: autocast's (``trainer.precision=bf16-mixed``: bfloat16) where it is on,
    else the stored weight's. The softmax and the loss always accumulate in float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return stored


def _consecutive(ids: torch.Tensor) -> bool:
    return int(ids[-1]) - int(ids[0]) == len(ids) - 1 and bool((ids.diff() == 1).all())


def column_blocks(weights: HeadWeights, vocab: int, dtype: torch.dtype) -> list[tuple[int, torch.Tensor]]:
    """The head's first ``vocab`` rows as ``(first column, matrix)`` pieces in ``dtype``, each cast once per call.

    Trainable rows that form one consecutive run (appended tokens do) are a piece of their own, so no copy of
    the whole head is merged each step (peft's forward writes them into one: 0.2 GB at 48k x 1,024 in float32);
    other ids are merged as peft does."""
    frozen = weights.weight[:vocab]
    if weights.rows is None or weights.ids is None:  # frozen, or the whole matrix trains
        return [(0, frozen.to(dtype))]
    ids, rows = weights.ids, weights.rows.detach()
    first, n = int(ids[0]), len(ids)
    if _consecutive(ids) and first + n <= vocab:
        pieces = [(0, frozen[:first]), (first, rows), (first + n, frozen[first + n :])]
        return [(column, m.to(dtype)) for column, m in pieces if len(m)]
    return [(0, frozen.index_copy(0, ids, rows.to(frozen.dtype)).to(dtype))]


def _columns(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[:, ids]``; a view when the ids are one consecutive run (appended tokens are)."""
    if _consecutive(ids):
        return x.narrow(1, int(ids[0]), len(ids))
    return x.index_select(1, ids)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ head.T`` against ``targets``, ``chunk`` rows at a time; the head is
    given as ``blocks`` of columns (``column_blocks``), all in the matmul dtype.

    The forward pass already computes both gradients (softmax minus one-hot, times the head or the hidden
    states), so no logits outlive their chunk and backward only scales them. Products run in the blocks'
    dtype; logits, softmax, the loss and the accumulated row gradient are float32.
    """

    @staticmethod
    def forward(ctx, hidden, rows, ids, blocks, vocab: int, targets, chunk: int):
        dtype = blocks[0][1].dtype
        grad_hidden = torch.empty_like(hidden)
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if rows is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows_per_chunk = min(chunk, hidden.shape[0])
        # buffers for the chunk's products and float32 logits (and the rows' gradient product), reused across
        # chunks: on the CPU a fresh large allocation costs more in page faults than the copy into it
        products = torch.empty(rows_per_chunk, vocab, dtype=dtype, device=hidden.device)
        buffer = products if dtype == torch.float32 else torch.empty_like(products, dtype=torch.float32)
        row_products = None
        with torch.autocast(hidden.device.type, enabled=False):  # every cast below is explicit
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
                product = products[: len(t)]
                for column, m in blocks:
                    torch.mm(h, m.T, out=product[:, column : column + len(m)])
                logits = product if buffer is products else buffer[: len(t)].copy_(product)
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=-1)
                probs = logits.sub_(top[:, None]).exp_()  # in place: the chunk's float32 buffer
                norm = probs.sum(dim=-1)
                total += (norm.log() + top - target_logit).sum()
                probs.div_(norm[:, None])[torch.arange(len(t), device=t.device), t] -= 1.0  # d nll / d logits
                grad_logits = product.copy_(probs) if product is not probs else probs
                part = sum((grad_logits[:, c : c + len(m)] @ m).float() for c, m in blocks)
                grad_hidden[start : start + chunk] = part.to(hidden.dtype)
                if grad_rows is not None:  # only the rows that train: the frozen ones need no gradient at all
                    # the whole matrix trains (ids None): padding rows past ``vocab`` get no gradient
                    columns = grad_logits if ids is None else _columns(grad_logits, ids)
                    target = grad_rows[:vocab] if ids is None else grad_rows
                    if dtype == torch.float32:
                        target.addmm_(columns.T, h)
                    else:  # the product in ``dtype``, widened into a reused float32 buffer, summed in float32
                        if row_products is None:
                            row_products = torch.empty(target.shape, dtype=dtype, device=h.device)
                            widened = torch.empty_like(target)
                        target.add_(widened.copy_(torch.mm(columns.T, h, out=row_products)))
        ctx.save_for_backward(grad_hidden, grad_rows)
        ctx.rows_dtype = rows.dtype if rows is not None else None
        ctx.scaled = False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # the saved gradients are this node's own: scaled in place, they become the gradients handed back (no
        # second copy of either), so a second backward through the same graph would scale them twice
        if ctx.scaled:
            raise RuntimeError("the fused cross-entropy's backward ran twice on one graph (retain_graph=True)")
        ctx.scaled = True
        grad_hidden, grad_rows = ctx.saved_tensors
        grad_rows = None if grad_rows is None else grad_rows.mul_(grad_total).to(ctx.rows_dtype)
        return grad_hidden.mul_(grad_total), grad_rows, None, None, None, None, None


def _chunk_nll_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # the float32 upcast transformers' loss makes, one chunk at a time
    return F.cross_entropy(logits, targets, reduction="sum")


def decoder_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's last hidden states for ``input_ids`` (the head's input), the new rows embedded by
    ``input_embeddings`` where peft trains them."""
    decoder = decoder_and_head(model)[0]
    embedded = input_embeddings(model, input_ids)
    inputs = {"input_ids": input_ids} if embedded is None else {"inputs_embeds": embedded}
    return decoder(
        **inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    logit_budget: int = TRAIN_LOGIT_BUDGET,
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over positions whose label is not -100.

    ``labels`` are aligned with ``input_ids`` (the transformers convention: the hidden state at t
    predicts label t+1). ``position_ids`` restarting inside a row (packed SFT conversations) make
    transformers build a block-diagonal causal mask when ``attention_mask`` is None.
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids)
    head = decoder_and_head(model)[1]
    targets = labels[:, 1:].reshape(-1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    scored = targets != IGNORE_INDEX
    if not bool(scored.all()):  # padding or prompt positions: their logits are never computed
        hidden, targets = hidden[scored], targets[scored]
    n = targets.numel()
    if n == 0:
        raise ValueError("no scored positions in the batch: every label is -100")
    chunk = max(1, logit_budget // model.config.vocab_size)
    weights = head_weights(head) if torch.is_grad_enabled() else None
    if weights is not None:
        # a padded vocabulary (bailong.model.build.extend_vocabulary): the softmax is over the real tokens only
        vocab = scored_vocab(model)
        blocks = column_blocks(weights, vocab, matmul_dtype(hidden.device, weights.weight.dtype))
        total = _FusedLinearCrossEntropy.apply(hidden, weights.rows, weights.ids, blocks, vocab, targets, chunk)
        return total / n
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll_sum, head, hidden[part], targets[part], use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(head, hidden[part], targets[part])
    return total / n
