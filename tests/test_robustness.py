"""Runs never train on garbage, never lose or overwrite results, never leak keys, load safely."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from bailong.model.build import build_model
from bailong.model.config import LoraConfig, QuantConfig
from bailong.train.callbacks import NonFiniteGuard
from bailong.train.pretrain import PretrainModule
from conftest import SMOKE_WITH_WANDB, base_config, compose_config


# -- a NaN/inf stops the run and keeps the last good state ------------------------------------------------
class PoisonedAt(PretrainModule):
    """Training goes bad at ``bad_step``: the loss becomes NaN, or one gradient becomes inf."""

    def __init__(self, model, bad_step: int, what: str):
        super().__init__(model, lr=1e-2, max_steps=20, warmup_steps=0)
        self.bad_step, self.what = bad_step, what
        self.good_states: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        if self.global_step == self.bad_step and self.what == "loss":  # NaN hidden states: the step's own check
            norm = self.model.get_base_model().model.norm
            handle = norm.register_forward_hook(lambda m, args, out: out * float("nan"))
            try:
                return super().training_step(batch, batch_idx)
            finally:
                handle.remove()
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.bad_step and self.what == "grad":
            param = next(p for n, p in self.named_parameters() if p.requires_grad and "lora_B" in n)
            param.register_hook(lambda g: g * float("inf"))  # finite loss, overflowing gradient
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.good_states[self.global_step] = {
            n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad
        }


def tiny_loader():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 64, (16,), generator=g) for _ in range(40)]
    return DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=2)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_training_stops_and_saves_the_last_good_state(tiny_base, tmp_path, what):
    model = build_model(
        base_config(str(tiny_base)),
        vocab_size=64,
        num_base=64,
        rows=None,
        quant=QuantConfig(name="none"),
        lora=LoraConfig(r=4, dropout=0.0),
    )
    module = PoisonedAt(model, bad_step=3, what=what)
    trainer = pl.Trainer(
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[NonFiniteGuard(dirpath=tmp_path / "checkpoints")],
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match=r"non-finite (training loss|gradient).*step 3") as err:
        trainer.fit(module, train_dataloaders=tiny_loader())
    saved = tmp_path / "checkpoints" / "last_good.ckpt"
    assert str(saved) in "\n".join(getattr(err.value, "__notes__", []))

    ckpt = torch.load(saved, weights_only=True)  # loadable without unpickling code
    # a bad loss at step 3: step 3's parameters came from update 2 and may be the damage, so step 2 is kept;
    # a bad gradient at step 3: step 3's loss passed, so step 3 is kept (the bad gradient was never applied)
    kept = 2 if what == "loss" else 3
    assert ckpt["global_step"] == kept
    good = module.good_states[kept]  # the parameters the kept step started from
    assert set(ckpt["state_dict"]) == {f"{n}" for n in good}
    for name, value in good.items():
        assert torch.isfinite(ckpt["state_dict"][name]).all()
        assert torch.equal(ckpt["state_dict"][name], value), name
    assert not torch.equal(good[name], module.good_states[0][name])  # it did train before going bad


# -- outputs of earlier runs are never overwritten --------------------------------------------------------
def test_a_finished_run_directory_is_never_overwritten(tmp_path):
    from bailong.checks import ConfigError
    from bailong.stages import run

    (tmp_path / "metrics.json").write_text('{"final/tc_bpc": 1.0}')
    with pytest.raises(ConfigError, match=r"metrics\.json exists: this directory holds a finished run"):
        run(compose_config(["experiment=smoke"], tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"final/tc_bpc": 1.0}


def test_an_unfinished_run_is_resumed_not_restarted_over(tmp_path):
    from bailong.checks import ConfigError, check_output_dir

    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 1}, tmp_path / "checkpoints" / "last.ckpt")  # advice names only one that loads
    with pytest.raises(ConfigError, match=rf"resume it with ckpt_path={tmp_path}/checkpoints/last\.ckpt"):
        check_output_dir(tmp_path, None)
    check_output_dir(tmp_path, str(tmp_path / "checkpoints" / "last.ckpt"))  # resuming is what it is for


# -- no API key is ever written ---------------------------------------------------------------------------
def test_redact_replaces_planted_keys_and_secret_named_values():
    from bailong.redact import REDACTED, redact

    config = {
        "logger": {"wandb": {"notes": "key=sk-planted-123456"}},
        "judge": {"api_key": "abc", "api_key_env": "J"},
        "tags": ["sk-planted-123456", "init=mean"],
        "lr": 1e-4,
    }
    assert redact(config, ["sk-planted-123456"]) == {
        "logger": {"wandb": {"notes": REDACTED}},
        "judge": {"api_key": REDACTED, "api_key_env": "J"},
        "tags": [REDACTED, "init=mean"],
        "lr": 1e-4,
    }


@pytest.mark.slow
def test_no_planted_key_reaches_any_output_of_a_run(tmp_path, monkeypatch, capfd, caplog):
    """Keys planted in the environment, and pulled into the config by interpolation, appear in no file
    the run writes (config, adapter, CSV, W&B offline run, checkpoints) and in no log line."""
    from bailong.stages import run

    wandb_key, judge_key = "planted-wandb-key-5f3a9c", "planted-judge-key-81d2e7"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("JUDGE_API_KEY", judge_key)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the key would otherwise switch W&B online
    caplog.set_level("DEBUG")
    out = tmp_path / "run"
    cfg = compose_config(
        [
            *SMOKE_WITH_WANDB,
            "logger=csv_wandb",
            "+logger.wandb.notes=${oc.env:WANDB_API_KEY}",  # config values that resolve to keys
            "+logger.wandb.config.judge=${oc.env:JUDGE_API_KEY}",
        ],
        out,
    )
    run(cfg)

    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.suffix == ".ckpt" for p in files)
    for key in (wandb_key, judge_key):
        leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
        assert not leaks, f"planted key written to {leaks}"
        captured = capfd.readouterr()
        assert key not in captured.out + captured.err
        assert key not in caplog.text
