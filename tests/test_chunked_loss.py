"""Chunked cross-entropy (bailong/train/loss.py) equals transformers' loss, and so do its gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from bailong.eval.bpc import score_batch, scoring_mode
from bailong.model.build import build_model
from bailong.model.config import LoraConfig, QuantConfig
from bailong.train.loss import HeadWeights, _FusedLinearCrossEntropy, causal_lm_loss, column_blocks
from conftest import base_config

NUM_BASE, VOCAB = 96, 128


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=NUM_BASE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def peft_model(path, quant: str, embeddings: str, *, dtype="float32", dropout=0.0, checkpointing=False):
    torch.manual_seed(1)
    rows = {"embed": torch.randn(VOCAB - NUM_BASE, 64) * 0.02, "head": torch.randn(VOCAB - NUM_BASE, 64) * 0.02}
    model = build_model(
        base_config(str(path), dtype=dtype),
        vocab_size=VOCAB,
        num_base=NUM_BASE,
        rows=rows,
        quant=QuantConfig(name=quant),
        lora=LoraConfig(r=4, alpha=8, dropout=dropout, embeddings=embeddings),
        gradient_checkpointing=checkpointing,
    )
    for name, p in model.named_parameters():  # one LoRA factor starts at zero: make every adapter path non-trivial
        if p.requires_grad and "lora_" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def batch(labels_masked: bool):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 40), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    if labels_masked:  # a padded row and an unscored prefix, as SFT and bpc windows have
        labels[0, :7] = -100
        ids[2, 30:], labels[2, 30:], mask[2, 30:] = 0, -100, 0
    return ids, labels, mask


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# new_rows and full take the fused linear + cross-entropy; lora (LoRA on lm_head) the checkpointed chunks
@pytest.mark.parametrize(
    "quant,embeddings",
    [("none", "new_rows"), ("nf4", "new_rows"), ("none", "full"), ("none", "lora"), ("none", "frozen")],
)
@pytest.mark.parametrize("labels_masked", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(tiny_base, quant, embeddings, labels_masked):
    model = peft_model(tiny_base, quant, embeddings)
    ids, labels, mask = batch(labels_masked)

    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    # 50 logits per chunk at vocab 128: one token per chunk, the most chunks possible
    chunked = causal_lm_loss(model, ids, labels, mask, logit_budget=50)
    chunked.backward()
    got = grads(model)

    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    assert set(got) == set(expected)
    assert embeddings not in ("new_rows", "full") or any("trainable_tokens" in n or "modules_to_save" in n for n in got)
    # float32 compute: equal to float32 rounding. NF4 computes in bfloat16, and the gradient reaching the
    # body is summed in another order (per chunk), so early layers differ at bfloat16 rounding (2**-8).
    tolerance = 1e-5 if quant == "none" else 4e-3
    for name in expected:
        assert expected[name].norm() > 0, f"{name}: gradient is zero, the test would prove nothing"
        relative = float((got[name] - expected[name]).norm() / expected[name].norm())
        assert relative < tolerance, f"{name}: relative gradient difference {relative:.2e}"


def test_training_loss_is_the_evaluators_bits_in_nats(tiny_base):
    """Training and bits/char scoring use the same targets: mean loss x tokens = bits x ln 2."""
    model = peft_model(tiny_base, "none", "new_rows")
    ids, labels, mask = batch(labels_masked=True)
    with scoring_mode(model):
        bits = score_batch(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}).sum()
        loss = causal_lm_loss(model, ids, labels, mask, logit_budget=300)
    scored = int((labels[:, 1:] != -100).sum())
    assert float(loss) * scored == pytest.approx(float(bits) * math.log(2), rel=1e-5)


def test_a_batch_with_nothing_to_score_is_an_error(tiny_base):
    model = peft_model(tiny_base, "none", "new_rows")
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="no scored positions"):
        causal_lm_loss(model, ids, torch.full_like(ids, -100))


def test_packed_rows_score_each_conversation_alone(tiny_base):
    """SFT packs conversations into one row with position_ids restarting per conversation: the chunked
    loss must see the block-diagonal mask transformers builds from them, as if each ran alone."""
    model = peft_model(tiny_base, "none", "new_rows")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 12), generator=g), torch.randint(0, VOCAB, (1, 20), generator=g)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(20)]).unsqueeze(0)
    labels = packed.clone()
    labels[0, 12] = -100  # the first token of a conversation is not predicted from the one before
    with torch.no_grad():
        together = causal_lm_loss(model, packed, labels, position_ids=positions) * 30
        alone = causal_lm_loss(model, a, a) * 11 + causal_lm_loss(model, b, b) * 19
        ignoring_positions = causal_lm_loss(model, packed, labels) * 30
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(ignoring_positions.item() - alone.item()) > 1e-3  # the test can tell the difference


@pytest.mark.parametrize("quant,embeddings", [("none", "new_rows"), ("nf4", "new_rows"), ("none", "full")])
def test_bf16_head_is_as_close_to_float32_as_transformers_own_bf16_loss(tiny_base, quant, embeddings):
    """trainer.precision=bf16-mixed: the head multiplies in bfloat16 (the softmax, the loss and the row gradient's
    sum in float32). The loss is transformers' own loss under the same autocast to float32 rounding, and the
    gradients are no further from the float32 ones than transformers' bf16 gradients are."""
    model = peft_model(tiny_base, quant, embeddings)
    ids, labels, mask = batch(labels_masked=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    exact = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    theirs = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_lm_loss(model, ids, labels, mask, logit_budget=50)
    ours.backward()
    got = grads(model)

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name in exact:
        ours_off = float((got[name] - exact[name]).norm() / exact[name].norm())
        theirs_off = float((theirs[name] - exact[name]).norm() / exact[name].norm())
        assert theirs_off > 0, f"{name}: autocast changed nothing, the test would prove nothing"
        assert ours_off <= 1.5 * theirs_off, f"{name}: {ours_off:.2e} from float32, transformers' bf16 {theirs_off:.2e}"


@pytest.mark.parametrize("ids", [[5, 6, 7], [1, 5, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
def test_fused_loss_with_trainable_rows_equals_the_merged_head(ids):
    """The head as pieces (frozen rows, trained rows: ``column_blocks``) gives the loss and gradients of the merged
    matrix peft's forward would build, for a consecutive run of trained rows, scattered ones and every row."""
    torch.manual_seed(3)
    weight = torch.randn(10, 4)
    rows = torch.randn(len(ids), 4, requires_grad=True)
    hidden = torch.randn(13, 4, requires_grad=True)
    targets = torch.randint(0, 10, (13,))
    index = torch.tensor(ids)
    expected = F.cross_entropy(hidden @ weight.index_copy(0, index, rows).T, targets, reduction="sum")
    expected.backward()
    want = hidden.grad.clone(), rows.grad.clone()
    hidden.grad = rows.grad = None

    weights = HeadWeights(weight, rows, index)
    blocks = column_blocks(weights, 10, torch.float32)
    assert len(blocks) == (3 if ids == [5, 6, 7] else 1)  # a consecutive run is its own piece, nothing merged
    got = _FusedLinearCrossEntropy.apply(hidden, rows, index, blocks, 10, targets, 4)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # float32: to its rounding
    torch.testing.assert_close((hidden.grad, rows.grad), want, rtol=1e-5, atol=1e-6)


def test_bf16_base_trains_under_autocast_with_checkpointing(tiny_base):
    """model.dtype=bfloat16 + NF4: the base's own weights stay bfloat16, what trains is float32, and a
    checkpointed step under autocast recomputes exactly what its forward did (LoRA inputs uncast for the fit)."""
    import bitsandbytes as bnb

    from bailong.model.build import follow_autocast

    model = peft_model(tiny_base, "nf4", "new_rows", dtype="bfloat16", dropout=0.1, checkpointing=True)
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            continue
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    follow_autocast(model, "bf16-mixed")
    ids, labels, mask = batch(labels_masked=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, ids, labels, mask)
    loss.backward()
    trained = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in trained)
    assert sum(float(g.norm()) for g in trained) > 0


@pytest.mark.parametrize("dtype,checkpointing", [("float32", False), ("bfloat16", True)])
def test_new_rows_are_embedded_without_merging_them_into_the_whole_matrix(tiny_base, monkeypatch, dtype, checkpointing):
    """The training loss looks the trainable rows up apart from the frozen matrix (``input_embeddings``): the
    embeddings are the ones peft's merged copy gives, bit for bit, and so are the loss and every gradient; the
    copy of the whole matrix is never built."""
    from bailong.train.loss import input_embeddings

    model = peft_model(tiny_base, "none", "new_rows", dtype=dtype, checkpointing=checkpointing)
    ids, labels, mask = batch(labels_masked=True)
    assert bool((ids >= NUM_BASE).any()) and bool((ids < NUM_BASE).any())
    embed = model.get_base_model().get_input_embeddings()
    torch.testing.assert_close(input_embeddings(model, ids), embed(ids), rtol=0, atol=0)

    def steps():
        loss = causal_lm_loss(model, ids, labels, mask)
        loss.backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        return loss.detach(), got

    expected_loss, expected = steps()  # the new path, then the same step through peft's own embedding forward
    layer = embed.token_adapter
    monkeypatch.setattr(layer, "get_merged_weights", lambda *a: pytest.fail("merged the rows into the matrix"))
    steps()  # the loss never calls peft's embedding forward
    monkeypatch.undo()
    import bailong.train.loss as loss_module

    monkeypatch.setattr(loss_module, "input_embeddings", lambda *a: None)
    reference_loss, reference = steps()
    assert float(expected_loss) == float(reference_loss)
    assert set(expected) == set(reference)
    embed_rows = [n for n in expected if "trainable_tokens" in n and "embed_tokens" in n]
    assert embed_rows and all(expected[n].norm() > 0 for n in embed_rows)
    for name in expected:  # the same sums in the same order: equal exactly
        # but for the embedded rows of a bfloat16 matrix: peft sums each row's gradient over its occurrences in the
        # matrix's dtype, this path in float32, so they differ at bfloat16 rounding (2**-8)
        rounding = 2**-8 if dtype == "bfloat16" and name in embed_rows else 0.0
        difference = float((expected[name] - reference[name]).norm())
        assert difference <= rounding * float(reference[name].norm()), f"{name}: gradients differ by {difference:.2e}"


def test_a_batch_without_new_tokens_still_trains_lora_under_checkpointing(tiny_base):
    """No appended id in the batch: the embeddings are all frozen rows, yet (as with peft's input-grad hook)
    the checkpointed layers still pass gradients to every LoRA factor."""
    model = peft_model(tiny_base, "none", "new_rows")
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    ids, labels, mask = batch(labels_masked=False)
    ids = ids % NUM_BASE
    causal_lm_loss(model, ids, ids.clone(), mask).backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.norm() > 0 for g in lora.values())


def test_a_second_backward_through_the_fused_loss_is_refused(tiny_base):
    """The fused loss hands back its saved gradients scaled in place: a second backward would scale them again."""
    model = peft_model(tiny_base, "none", "new_rows")
    ids, labels, mask = batch(labels_masked=False)
    loss = causal_lm_loss(model, ids, labels, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
