"""Faults a careless setting or a full disk causes: the guard keeps the state from before the damage and resumes
with the new learning rate; checkpoints are whole or absent; resume advice names only checkpoints that load."""

from __future__ import annotations

import errno
import logging
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import bailong.train.checkpoint_io as checkpoint_io
from bailong.checks import ConfigError, check_output_dir, checkpoint_problem
from bailong.data.config import CorpusConfig
from bailong.model.build import build_model
from bailong.model.config import LoraConfig, QuantConfig
from bailong.train.callbacks import NonFiniteGuard
from bailong.train.checkpoint_io import PARTIAL_SUFFIX, AtomicCheckpointIO
from bailong.train.pretrain import PretrainModule, warmup_cosine
from conftest import ROOT, base_config, compose_config


def tiny_model(base):
    torch.manual_seed(1)
    return build_model(
        base_config(str(base)),
        vocab_size=64,
        num_base=64,
        rows=None,
        quant=QuantConfig(name="none"),
        lora=LoraConfig(r=4, dropout=0.0),
    )


def tiny_loader(n: int = 40):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 64, (16,), generator=g) for _ in range(n)]
    return DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=2)


class Recorder(pl.Callback):
    """Per optimizer step: the parameters it starts from, each group's lr, and the loss."""

    def __init__(self):
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, list[float]] = {}
        self.losses: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.params[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.lrs[step] = [g["lr"] for g in trainer.optimizers[0].param_groups]

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses[trainer.global_step] = float(loss.detach())


def default_callbacks(out: Path) -> list[pl.Callback]:
    """conf/callbacks/default.yaml as a run to ``out`` instantiates it (checkpoints every 2 steps), without the
    LR monitor, which needs a logger."""
    cfg = compose_config(["experiment=smoke", "train.checkpoint_every_n_steps=2"], out)
    return [instantiate(c) for name, c in cfg.callbacks.items() if c is not None and name != "lr_monitor"]


def trainer_for(tmp_path, max_steps, *callbacks, **kwargs):
    return pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        **{"enable_checkpointing": False, **kwargs},
    )


# -- item 3: the guard keeps the state from before the damaging update; a resume honours the new lr -------
def test_a_huge_learning_rate_leaves_a_finite_pre_damage_state_and_a_resume_at_the_new_lr(tiny_base, tmp_path, caplog):
    """lr=1e20: step 0's update makes finite parameters of ~1e20, step 1's loss is NaN. last_good.ckpt must hold
    step 0 (finite, untouched by the update), and resuming it with lr=1e-3 must train at 1e-3, not at the
    checkpoint's 1e20."""
    record = Recorder()
    module = PretrainModule(tiny_model(tiny_base), lr=1e20, max_steps=4, warmup_steps=0)
    guard = NonFiniteGuard(dirpath=tmp_path / "checkpoints")
    with pytest.raises(FloatingPointError, match=r"at step 1") as err:
        trainer_for(tmp_path, 4, record, guard).fit(module, train_dataloaders=tiny_loader())
    saved = tmp_path / "checkpoints" / "last_good.ckpt"
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert f"{saved} holds step 0" in notes and f"ckpt_path={saved}" in notes and "train.lr=1e+19" in notes
    assert max(p.abs().max() for p in record.params[1].values()) > 1e15  # the update did the damage

    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["global_step"] == 0
    for name, before in record.params[0].items():
        assert torch.isfinite(ckpt["state_dict"][name]).all(), name
        assert torch.equal(ckpt["state_dict"][name], before), name

    caplog.set_level(logging.INFO, logger="bailong.train.pretrain")
    resumed, record = PretrainModule(tiny_model(tiny_base), lr=1e-3, max_steps=4, warmup_steps=0), Recorder()
    trainer = trainer_for(tmp_path / "resumed", 4, record, NonFiniteGuard(dirpath=tmp_path / "resumed"))
    trainer.fit(resumed, train_dataloaders=tiny_loader(), ckpt_path=saved, weights_only=True)
    assert trainer.global_step == 4 and all(math.isfinite(v) for v in record.losses.values())
    for step in range(4):  # the new peak on the restored schedule
        assert record.lrs[step] == pytest.approx([1e-3 * warmup_cosine(step, 0, 4, 0.1)], rel=1e-12), step
    assert "lora lr 1e+20 -> 0.001" in caplog.text


def test_a_model_collapsed_to_uniform_guessing_is_stopped(tmp_path):
    """lr=1e6 on the mini base: step 1's loss is finite but exactly ln V (a uniform distribution). Before the
    guard knew a blown-up loss, this ran to the end with a ruined model."""
    from bailong.data.corpus import load_documents
    from bailong.tokenization import load_tokenizer

    tok = load_tokenizer(str(ROOT / "models" / "mini-base"))
    docs = load_documents([CorpusConfig(path=str(ROOT / "data/en/kjv.jsonl.gz"), max_docs=30)])
    ids = [i for d in docs for i in tok.encode(d)]
    rows = [torch.tensor(ids[i : i + 64]) for i in range(0, 64 * 8, 64)]
    loader = DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=2)
    torch.manual_seed(0)
    model = build_model(
        base_config(str(ROOT / "models" / "mini-base")),
        vocab_size=len(tok),
        num_base=len(tok),
        rows=None,
        quant=QuantConfig(name="none"),
        lora=LoraConfig(r=4, dropout=0.0),
    )
    record, guard = Recorder(), NonFiniteGuard(dirpath=tmp_path)
    with pytest.raises(
        FloatingPointError,
        match=r"training loss .* at step 1 has blown up: above .* nats, more "
        r"than halfway from the first step's loss .* to uniform guessing "
        r"over 5000 tokens",
    ):
        trainer_for(tmp_path, 4, record, guard).fit(
            PretrainModule(model, lr=1e6, max_steps=4, warmup_steps=0), train_dataloaders=loader
        )
    assert record.losses[1] == pytest.approx(math.log(len(tok)), abs=1e-3)  # uniform: the case at hand
    assert record.losses[0] < guard.loss_limit() < record.losses[1]
    assert torch.load(tmp_path / "last_good.ckpt", weights_only=True)["global_step"] == 0


def test_the_blown_up_line_sits_halfway_to_uniform_guessing():
    guard = NonFiniteGuard()
    guard.first_loss, guard.vocab_size = 5.09, 13000  # the mini default's first step
    assert guard.loss_limit() == pytest.approx(5.09 + (math.log(13000) - 5.09) / 2)
    guard.first_loss = math.log(13000)  # a random base starts at uniform: at least min_rise above it
    assert guard.loss_limit() == pytest.approx(math.log(13000) + 1.0)
    guard.first_loss, guard.vocab_size = 3.0, None  # vocabulary unknown: a doubled loss
    assert guard.loss_limit() == pytest.approx(6.0)


def test_the_first_loss_survives_a_resume():
    guard = NonFiniteGuard()
    guard.first_loss = 4.2
    fresh = NonFiniteGuard()
    fresh.load_state_dict(guard.state_dict())
    assert fresh.first_loss == 4.2


class NaNLossAt(PretrainModule):
    def __init__(self, model, bad_step):
        super().__init__(model, lr=1e-2, max_steps=20, warmup_steps=0)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.bad_step:
            raise FloatingPointError(f"non-finite training loss (nan) at step {self.global_step}")
        return loss


def test_without_a_kept_state_the_guard_names_a_periodic_checkpoint_whose_loss_passed(tiny_base, tmp_path):
    """keep_state=False (what FSDP gets): nothing is written; the newest periodic checkpoint is named only if its
    step's loss passed (the checkpoint of step 4 holds the parameters step 4's loss was computed from)."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=1)
    guard = NonFiniteGuard(dirpath=tmp_path / "ckpt", keep_state=False)
    with pytest.raises(FloatingPointError) as err:
        trainer_for(tmp_path, 10, checkpoints, guard, enable_checkpointing=True).fit(
            NaNLossAt(tiny_model(tiny_base), bad_step=5), train_dataloaders=tiny_loader()
        )
    assert not (tmp_path / "ckpt" / "last_good.ckpt").exists()
    notes = "\n".join(err.value.__notes__)
    assert f"{tmp_path / 'ckpt' / 'last.ckpt'} is from a step whose loss passed" in notes

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=2, save_last=True, save_top_k=1)
    with pytest.raises(FloatingPointError) as err:  # the loss of step 4 itself fails: its checkpoint is suspect
        trainer_for(
            tmp_path,
            10,
            checkpoints,
            NonFiniteGuard(dirpath=tmp_path / "ckpt2", keep_state=False),
            enable_checkpointing=True,
        ).fit(NaNLossAt(tiny_model(tiny_base), bad_step=4), train_dataloaders=tiny_loader())
    assert "no state before it passed the checks, so nothing was saved" in "\n".join(err.value.__notes__)


# -- item 7: checkpoints are whole or absent; the resume advice names one that loads ---------------------------
class DiskFullAfter:
    """A file object on a disk with ``room`` bytes left: writing past it raises ENOSPC, as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_disk_after(monkeypatch, room: int) -> None:
    real_save = checkpoint_io.torch_save
    monkeypatch.setattr(checkpoint_io, "torch_save", lambda obj, f: real_save(obj, DiskFullAfter(f, room)))


def disk_full(error: BaseException) -> bool:
    """ENOSPC, raised as is or under the RuntimeError torch.save's zip writer raises while closing the archive."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__context__
    return False


def test_a_full_disk_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.arange(1000.0)}, target)
    before = target.read_bytes()
    fill_disk_after(monkeypatch, room=2048)
    with pytest.raises((OSError, RuntimeError)) as err:
        AtomicCheckpointIO().save_checkpoint({"global_step": 4, "w": torch.zeros(100_000)}, target)
    assert disk_full(err.value)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_a_checkpoint_gets_the_usual_file_mode(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_run_whose_disk_fills_can_be_resumed_from_what_it_left(tiny_base, tmp_path, monkeypatch):
    """Training with the default callbacks; the disk fills while step 4's checkpoint is written. What is left
    loads, the advice names it, and nothing partial or truncated remains."""
    out = tmp_path / "run"
    callbacks = default_callbacks(out)

    class FillDiskAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                fill_disk_after(monkeypatch, room=4096)

    module = PretrainModule(tiny_model(tiny_base), lr=1e-2, max_steps=6, warmup_steps=0)
    with pytest.raises((OSError, RuntimeError)) as err:
        trainer_for(out, 6, FillDiskAtStep(), *callbacks, enable_checkpointing=True).fit(
            module, train_dataloaders=tiny_loader()
        )
    assert disk_full(err.value)
    folder = out / "checkpoints"
    assert not list(folder.glob(f"*{PARTIAL_SUFFIX}"))
    assert {p.name for p in folder.glob("*.ckpt")} == {"epoch=0-step=2.ckpt", "last.ckpt"}
    assert all(checkpoint_problem(p) is None for p in folder.glob("*.ckpt"))
    with pytest.raises(ConfigError, match=rf"resume it with ckpt_path={folder}/last\.ckpt"):
        check_output_dir(out, None)


def a_checkpoint(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.arange(50_000.0)}}, path)
    return path


def test_resume_advice_skips_a_truncated_checkpoint_and_names_it(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = a_checkpoint(folder / "epoch=0-step=2.ckpt", 2)
    whole = a_checkpoint(folder / "last.ckpt", 4).read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # what a full disk left before atomic writes
    with pytest.raises(ConfigError) as err:
        check_output_dir(tmp_path, None)
    message = str(err.value)
    assert f"resume it with ckpt_path={good}," in message
    assert "Damaged (they do not load, do not resume from them): last.ckpt (truncated" in message


def test_resume_advice_skips_a_link_to_a_removed_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = a_checkpoint(folder / "epoch=0-step=4.ckpt", 4)
    (folder / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")  # killed between removing step 2 and relinking
    with pytest.raises(ConfigError, match=rf"resume it with ckpt_path={good},.*last\.ckpt \(a link to a missing"):
        check_output_dir(tmp_path, None)


def test_resume_advice_when_no_checkpoint_loads(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    (folder / "epoch=0-step=2.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ConfigError, match=r"none loads: epoch=0-step=2\.ckpt \(truncated .*last\.ckpt \(empty\)"):
        check_output_dir(tmp_path, None)


def test_resume_advice_after_a_guard_stop_names_last_good_and_a_lower_lr(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    a_checkpoint(folder / "epoch=0-step=2.ckpt", 2)
    (folder / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")
    good = a_checkpoint(folder / "last_good.ckpt", 1)
    os.utime(folder / "epoch=0-step=2.ckpt", (1, 1))  # last_good.ckpt was written last, when the guard stopped
    with pytest.raises(
        ConfigError,
        match=rf"stopped on a non-finite or blown-up loss: resume from the state before "
        rf"the damage with ckpt_path={good} and a lower train\.lr",
    ):
        check_output_dir(tmp_path, None)


def test_a_member_with_a_bad_crc_is_damaged(tmp_path):
    path = a_checkpoint(tmp_path / "x.ckpt", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the archive's directory is still whole
    path.write_bytes(bytes(data))
    assert "fails its CRC check" in checkpoint_problem(path)


# -- item 8: one checkpoint file per run, last.ckpt links to it ------------------------------------------------
def test_last_checkpoint_is_a_link_not_a_second_copy(tiny_base, tmp_path):
    out = tmp_path / "run"
    callbacks = default_callbacks(out)
    module = PretrainModule(tiny_model(tiny_base), lr=1e-2, max_steps=4, warmup_steps=0)
    trainer_for(out, 4, *callbacks, enable_checkpointing=True).fit(module, train_dataloaders=tiny_loader())
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=4.ckpt"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 4


@pytest.mark.parametrize(
    "overrides",
    [[], ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], ["trainer=fsdp_cpu", "quant=none"]],
)
def test_the_pipeline_trainer_writes_checkpoints_atomically(tmp_path, monkeypatch, overrides):
    """Every strategy the pipeline builds saves through AtomicCheckpointIO (passed as a Trainer plugin)."""
    import bailong.stages.common as pipeline

    built = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *args, **kwargs: built.append(self))
    cfg = compose_config(["experiment=smoke", "logger=csv", *overrides], tmp_path)
    pipeline.fit(cfg, module=None, datamodule=None, metrics={})
    assert isinstance(built[0].strategy.checkpoint_io, AtomicCheckpointIO), type(built[0].strategy).__name__


def test_the_loss_limit_sees_the_loss_not_the_fp16_scaled_loss():
    """Under 16-mixed, on_before_backward receives the loss times the GradScaler's scale: the guard divides it back
    (else every fp16 run would 'blow up' at its second step)."""
    from types import SimpleNamespace

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = SimpleNamespace(accumulate_grad_batches=2, global_step=0, precision_plugin=SimpleNamespace(scaler=scaler))
    guard = NonFiniteGuard()
    guard.vocab_size = 64
    guard.on_before_backward(trainer, None, torch.tensor(3.0 / 2 * 1024))  # loss 3, accumulation 2, scale 1024
    assert guard.first_loss == pytest.approx(3.0)
    trainer.global_step = 1
    guard.on_before_backward(trainer, None, torch.tensor(3.5 / 2 * 1024))
    with pytest.raises(FloatingPointError, match="training loss 9 at step 1 has blown up"):
        guard.on_before_backward(trainer, None, torch.tensor(9.0 / 2 * 1024))
