"""SFT as a LightningModule: ``PretrainModule`` (optimiser, schedule, checkpoints, bits/char validation)
validating on held-out conversations; the inherited training step passes the packed rows' ``position_ids``.

With ``position_ids`` restarting per conversation, ``attention_mask=None`` and ``use_cache=False``,
transformers builds a block-diagonal causal mask, so packed conversations never see each other.
Validation batches are whole held-out conversations (``bailong.data.sft``): ``val/chat_bpc`` is bits
per character of the held-out assistant replies.
"""

from __future__ import annotations

import torch

from bailong.train.pretrain import PretrainModule


class SFTModule(PretrainModule):
    def __init__(self, model: torch.nn.Module, **kwargs) -> None:
        super().__init__(model, val_names=("chat",), **kwargs)
