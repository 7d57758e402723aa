"""One LoRA dropout mask per input (``lora.shared_dropout_mask``), with peft still the LoRA implementation.

peft gives every adapted projection its own ``nn.Dropout``, so a Llama block draws seven Bernoulli masks per step
and keeps seven dropped copies of activations for backward, though q/k/v read one tensor (the normed hidden
states) and gate/up another. Here the projections that read the same input share one dropout module which,
within one forward of the attention or MLP module that owns them, drops that input once and hands the same
dropped tensor to each adapter: three masks and three copies per block instead of seven. Each adapter still sees
its input dropped with probability ``p`` and rescaled by ``1/(1-p)``; what changes is that q, k and v (gate and
up) see the same units dropped, not independent ones.

The cached tensor lives only while its owner's forward runs (a forward hook clears it), so no activation is kept
beyond what autograd saves, and gradient checkpointing's recomputation draws the same single mask again from the
restored RNG state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# modules of a Llama-style block whose projections read one input: attention's q/k/v, the MLP's gate/up
SHARED_INPUTS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class SharedDropout(nn.Module):
    """Dropout that returns the same dropped tensor for the same input tensor until ``clear``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.clear()

    def clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # the same tensor, unmodified in place since it was dropped
        if x is self._input and x._version == self._version:
            return self._output
        out = F.dropout(x, self.p, training=True)
        self._input, self._version, self._output = x, x._version, out
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, shared"


def _clear_after_forward(shared: list[SharedDropout]):
    def hook(module, args, output):
        for dropout in shared:
            dropout.clear()

    return hook


def share_dropout_masks(model: nn.Module) -> int:
    """Give the LoRA projections that read one input (``SHARED_INPUTS``) one ``SharedDropout`` per adapter; returns
    how many groups now share a mask. A no-op where dropout is 0 (peft's ``nn.Identity``)."""
    from peft.tuners.lora import LoraLayer

    groups = 0
    for name, module in model.named_modules():
        owner = name.rsplit(".", 1)[-1]
        if owner not in SHARED_INPUTS:
            continue
        layers = [getattr(module, p, None) for p in SHARED_INPUTS[owner]]
        layers = [layer for layer in layers if isinstance(layer, LoraLayer)]
        if len(layers) < 2:
            continue
        shared: list[SharedDropout] = []
        for adapter, dropout in layers[0].lora_dropout.items():
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0:
                continue
            one = SharedDropout(dropout.p)
            for layer in layers:
                layer.lora_dropout[adapter] = one
            shared.append(one)
        if shared:
            module.register_forward_hook(_clear_after_forward(shared))
            groups += 1
    return groups
