"""The training module's pieces: schedule, optimizers, parameter groups, checkpoint contents."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

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


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_is_clipped_as_configured(precision, algorithm):
    """AdamW is torch's fused kernel; trainer.gradient_clip_val still clips (Lightning's mixed-precision plugin
    refuses to clip for a fused optimizer, so the module clips itself) and 16-mixed gets the unfused one."""
    model = torch.nn.Linear(4, 4)
    module = PretrainModule(model, lr=1e-3, max_steps=1)
    module._trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(opt, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if algorithm == "norm":
        assert float(grads.norm()) == pytest.approx(0.5, rel=1e-5)
    else:
        assert torch.equal(grads, torch.full_like(grads, 0.5))
    p = torch.nn.Parameter(torch.ones(4))
    assert not make_optimizer("adamw", [{"params": [p]}], (0.9, 0.95), fused=False).defaults["fused"]


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
    assert set(ckpt["state_dict"]) == {
        "model.lora_A.weight",
        "model.lora_A.bias",
        "model.trainable_tokens.weight",
        "model.trainable_tokens.bias",
    }
    draw = torch.rand(3)
    module.on_load_checkpoint(ckpt)  # restores the RNG as it was at save time
    assert torch.equal(torch.rand(3), draw)


class TwoKindsModule(PretrainModule):
    """PretrainModule's optimiser, schedule and checkpoints around TwoKinds (a squared-output loss)."""

    def training_step(self, batch, batch_idx):
        return (self.model.lora_A(batch) + self.model.trainable_tokens(batch)).pow(2).mean()


class GroupSettings(pl.Callback):
    """Each step's optimizer groups as the step starts: (lr, weight_decay) per group."""

    def __init__(self):
        self.steps: dict[int, list[tuple[float, float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.steps[trainer.global_step] = [(g["lr"], g["weight_decay"]) for g in groups]


def fit_two_kinds(tmp_path, callbacks, ckpt_path=None, **hp):
    torch.manual_seed(0)
    module = TwoKindsModule(TwoKinds(), max_steps=6, warmup_steps=2, **hp)
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), batch_size=2)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)


def test_a_resume_trains_at_the_configured_learning_rate_not_the_checkpoints(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bailong.train.pretrain")
    saved = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    straight = GroupSettings()
    fit_two_kinds(tmp_path, [saved, straight], lr=1e-2, embedding_lr=1e-1)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert "resumed at step" not in caplog.text  # a fresh run changes nothing

    same = GroupSettings()  # the same settings: the restored optimizer is left as it is
    fit_two_kinds(tmp_path / "same", [same], ckpt_path=ckpt, lr=1e-2, embedding_lr=1e-1)
    assert "resumed at step" not in caplog.text
    assert [same.steps[s] for s in (3, 4, 5)] == [straight.steps[s] for s in (3, 4, 5)]

    lowered = GroupSettings()
    fit_two_kinds(tmp_path / "lowered", [lowered], ckpt_path=ckpt, lr=2e-3, weight_decay=0.01)
    for step in (3, 4, 5):  # the new peak, at the restored schedule's position; embedding_lr null: train.lr
        factor = warmup_cosine(step, 2, 6, 0.1)
        assert lowered.steps[step] == [
            pytest.approx((2e-3 * factor, 0.01), rel=1e-12),
            pytest.approx((2e-3 * factor, 0.0), rel=1e-12),
        ], step
    assert (
        "resumed at step 3 with the config's optimizer settings, not the checkpoint's: lora lr 0.01 -> 0.002; "
        "lora weight_decay 0.0 -> 0.01; embeddings lr 0.1 -> 0.002"
    ) in caplog.text
