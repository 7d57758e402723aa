"""The training module's pieces: schedule, optimizers, parameter groups, checkpoint contents."""
from __future__ import annotations

import pytest
import torch

from bailong.train.pretrain import PretrainModule, _param_groups, make_optimizer, warmup_cosine


def test_warmup_then_cosine_to_floor():
    lrs = [warmup_cosine(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing after warm-up
    assert lrs[110] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.55)


def test_adamw_8bit_steps_on_cpu():
    p = torch.nn.Parameter(torch.ones(4096))
    opt = make_optimizer("adamw_8bit", [{"params": [p], "lr": 1e-2}], (0.9, 0.95))
    p.grad = torch.ones(4096)
    opt.step()
    assert torch.all(p < 1)


def test_paged_optimizer_needs_a_gpu_and_unknown_names_fail():
    p = torch.nn.Parameter(torch.ones(4))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="paged_adamw.*needs a GPU"):
            make_optimizer("paged_adamw", [{"params": [p]}], (0.9, 0.95))
    with pytest.raises(ValueError, match="train.optimizer='sgd'"):
        make_optimizer("sgd", [{"params": [p]}], (0.9, 0.95))


class TwoKinds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.Linear(4, 4)
        self.trainable_tokens = torch.nn.Linear(4, 4)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)


def test_new_rows_get_their_own_learning_rate():
    groups = _param_groups(TwoKinds(), lr=1e-4, embedding_lr=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora"]["lr"] == 1e-4 and by_name["embeddings"]["lr"] == 1e-3
    assert by_name["embeddings"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == 4  # frozen weights are in no group


def test_checkpoint_keeps_only_trainable_parameters_and_rng():
    module = PretrainModule(TwoKinds(), lr=1e-3, max_steps=10)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"model.lora_A.weight", "model.lora_A.bias",
                                       "model.trainable_tokens.weight", "model.trainable_tokens.bias"}
    draw = torch.rand(3)
    module.on_load_checkpoint(ckpt)  # restores the RNG as it was at save time
    assert torch.equal(torch.rand(3), draw)
