"""``lora.shared_dropout_mask`` (bailong/model/lora_dropout.py) on the tiny Llama of test_build, 4-bit and full
precision: one dropout module per input, the same dropped tensor for q/k/v (gate/up), independent masks otherwise,
nothing cached after a forward, and gradient checkpointing's recomputation drawing the same mask."""

from __future__ import annotations

import pytest
import torch

from bailong.model.lora_dropout import SharedDropout
from test_build import NF4, NONE, batch, build, lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_build import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny"))


def layer_modules(model, layer: int = 0) -> dict[str, torch.nn.Module]:
    prefix = f"layers.{layer}."
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if prefix in n and n.endswith("_proj")}


def dropped_inputs(model, ids) -> dict[str, torch.Tensor]:
    """What each LoRA A matrix of layer 0 received in one training forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.lora_A["default"].register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
        for name, m in layer_modules(model).items()
    ]
    model.train()
    model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("quant", [NONE, NF4])
def test_projections_reading_one_input_share_one_mask(tiny, quant):
    torch.manual_seed(0)
    model = build(tiny, quant=quant, lora=lora(dropout=0.3, shared_dropout_mask=True))
    mods = layer_modules(model)
    drop = {name: m.lora_dropout["default"] for name, m in mods.items()}
    assert drop["q_proj"] is drop["k_proj"] is drop["v_proj"] and isinstance(drop["q_proj"], SharedDropout)
    assert drop["gate_proj"] is drop["up_proj"] and drop["gate_proj"] is not drop["q_proj"]
    assert not isinstance(drop["o_proj"], SharedDropout) and not isinstance(drop["down_proj"], SharedDropout)

    seen = dropped_inputs(model, batch(0))
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"] and seen["gate_proj"] is seen["up_proj"]
    zeros = (seen["q_proj"] == 0).float().mean().item()
    assert 0.2 < zeros < 0.4  # p = 0.3 of the units dropped (the inputs themselves are never exactly 0)
    # nothing held after the forward: the cache lives only within the owner's forward
    assert all(d._output is None and d._input is None for d in model.modules() if isinstance(d, SharedDropout))


def test_the_default_draws_one_mask_per_projection(tiny):
    torch.manual_seed(0)
    model = build(tiny, quant=NONE, lora=lora(dropout=0.3))
    seen = dropped_inputs(model, batch(0))
    assert not torch.equal(seen["q_proj"] == 0, seen["k_proj"] == 0)
    assert not any(isinstance(m, SharedDropout) for m in model.modules())


def test_eval_and_zero_dropout_leave_the_input_alone(tiny):
    model = build(tiny, quant=NONE, lora=lora(dropout=0.0, shared_dropout_mask=True))
    assert not any(isinstance(m, SharedDropout) for m in model.modules())  # peft's Identity stays
    model = build(tiny, quant=NONE, lora=lora(dropout=0.3, shared_dropout_mask=True))
    model.eval()
    x = torch.randn(2, 5, 8)
    shared = next(m for m in model.modules() if isinstance(m, SharedDropout))
    assert shared(x) is x


@pytest.mark.parametrize("quant", [NONE, NF4])
def test_checkpointing_recomputes_the_same_shared_mask(tiny, quant):
    """With gradient checkpointing the forward is recomputed in backward from the restored RNG state: the shared
    mask must come out the same, so the gradients equal those of the run without checkpointing."""
    ids = batch(1)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build(tiny, quant=quant, lora=lora(dropout=0.3, shared_dropout_mask=True))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
