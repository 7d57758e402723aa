"""Continued pre-training as a LightningModule: the whole training step, top to bottom."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

from bailong.eval.bpc import score_batch
from bailong.model.build import follow_autocast
from bailong.train.loss import TRAIN_LOGIT_BUDGET, causal_lm_loss

log = logging.getLogger(__name__)


def _param_groups(model: torch.nn.Module, lr: float, embedding_lr: float | None, weight_decay: float):
    """LoRA matrices at ``lr``; the new embedding/head rows (peft trainable tokens or saved modules) at
    ``embedding_lr``, since freshly initialised rows usually want a different step size than LoRA.
    DoRA's magnitudes (``lora.use_dora``) at ``lr`` without weight decay: like norm scales, they start at the
    weight's row norms, and decay would pull them toward zero rather than toward that start.
    A full fine-tuning model (``finetune=full``) is split by ``_full_param_groups``."""
    if (getattr(model, "bailong_build", None) or {}).get("finetune") == "full":
        return _full_param_groups(model, lr, embedding_lr, weight_decay)
    lora, magnitudes, rows = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_row = "trainable_tokens" in name or "modules_to_save" in name
        (rows if is_row else magnitudes if "lora_magnitude_vector" in name else lora).append(p)
    groups = [
        {"params": lora, "lr": lr, "weight_decay": weight_decay, "name": "lora"},
        {"params": magnitudes, "lr": lr, "weight_decay": 0.0, "name": "dora_magnitudes"},
    ]
    if rows:
        groups.append({"params": rows, "lr": embedding_lr or lr, "weight_decay": 0.0, "name": "embeddings"})
    return [g for g in groups if g["params"]]


def _full_param_groups(model: torch.nn.Module, lr: float, embedding_lr: float | None, weight_decay: float):
    """Full fine-tuning: the embedding and head matrices at ``embedding_lr`` (default ``lr``), everything else
    at ``lr``.

    Why this split: those two matrices hold the freshly initialised rows, which get ``embedding_lr`` in a LoRA
    run too, so one setting means the same for both modes; an AdamW group holds whole tensors, so the old rows
    of the matrices move at that lr as well (a per-row lr would need another optimizer). Weight decay:
    ``weight_decay`` on the decoder's weight matrices; none on the embedding/head matrices (as for LoRA's
    rows: decay would pull the rows of rare tokens, which seldom get a gradient, toward zero) nor on the
    1-D RMSNorm scales (decay pulls them toward 0, not toward their neutral 1)."""
    matrices = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    groups: dict[str, list] = {"decoder": [], "norms": [], "embeddings": []}
    for p in model.parameters():  # a tied head is the embedding's own parameter: listed once
        if p.requires_grad:
            groups["embeddings" if id(p) in matrices else "norms" if p.ndim < 2 else "decoder"].append(p)
    settings = {"decoder": (lr, weight_decay), "norms": (lr, 0.0), "embeddings": (embedding_lr or lr, 0.0)}
    return [
        {"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
        for name, params in groups.items()
        if params
    ]


def make_optimizer(
    name: str, groups: list[dict], betas: tuple[float, float], *, fused: bool = True
) -> torch.optim.Optimizer:
    """``train.optimizer``: torch's AdamW, fused unless ``fused=False`` (a 16-mixed run: Lightning unscales fp16
    gradients before clipping only for unfused optimizers), or one of bitsandbytes' 8-bit / paged AdamWs."""
    if name == "adamw":  # fused: one kernel per step, 4x the per-tensor loop on this CPU; transformers' default too
        return torch.optim.AdamW(groups, betas=betas, fused=fused)
    import bitsandbytes as bnb

    optimizers = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }
    if name not in optimizers:
        raise ValueError(f"train.optimizer={name!r}: expected one of adamw, {', '.join(optimizers)}")
    if name.startswith("paged") and not torch.cuda.is_available():
        raise ValueError(f"train.optimizer={name!r} pages optimizer state to CUDA memory: needs a GPU; use adamw")
    return optimizers[name](groups, betas=betas)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PretrainModule(pl.LightningModule):
    """Causal-LM training of a peft model; validation reports bits per character per language.

    Validation loaders come in the order of ``val_names`` (e.g. tc, en) and hold the evaluator's scoring
    windows (``labels`` -100 where a position is not scored, ``chars`` covered), so ``val/tc_bpc`` is
    exactly ``bailong.eval.bpc.bits_per_char`` on the same text.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        max_steps: int,
        optimizer: str = "adamw",
        embedding_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        val_names: tuple[str, ...] = ("tc", "en"),
        logit_budget: int = TRAIN_LOGIT_BUDGET,
    ) -> None:
        super().__init__()
        self.model = model
        self.hp = dict(
            lr=lr,
            max_steps=max_steps,
            optimizer=optimizer,
            embedding_lr=embedding_lr,
            weight_decay=weight_decay,
            betas=tuple(betas),
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        self.val_names = tuple(val_names)
        self.logit_budget = logit_budget
        # checkpoints hold only the trainable parameters (the 4-bit base is reloaded from the hub/disk)
        self.strict_loading = False
        self._val_bits: dict[str, float] = {}
        self._val_chars: dict[str, int] = {}

    # -- training ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        follow_autocast(self.model, self.trainer.precision)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # chunked cross-entropy: full-vocabulary logits are never materialised (bailong/train/loss.py)
        loss = causal_lm_loss(
            self.model,
            batch["input_ids"],
            batch["labels"],
            batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            logit_budget=self.logit_budget,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; lower train.lr or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``trainer.gradient_clip_val`` by global norm, also under FSDP: Lightning's FSDP precision plugin refuses
        norm clipping, so there the FSDP root clips (its ``clip_grad_norm_`` takes the norm over every shard)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: FSDP runs clip by norm")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False):
            # a fused AdamW: Lightning's mixed-precision plugin refuses to clip for it even under bf16-mixed, where
            # no scaler holds the gradients scaled (16-mixed runs get the unfused optimizer: configure_optimizers)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hp
        groups = _param_groups(self.model, hp["lr"], hp["embedding_lr"], hp["weight_decay"])
        # what the config asks, per group: a resumed run's restored optimizer is set back to it (on_train_start)
        self._configured_groups = [
            {"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "betas": tuple(hp["betas"])}
            for g in groups
        ]
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        opt = make_optimizer(hp["optimizer"], groups, hp["betas"], fused=str(precision) != "16-mixed")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, hp["warmup_steps"], hp["max_steps"], hp["min_lr_ratio"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run trains with the config's learning rates, weight decay and betas, not the checkpoint's.

        Lightning restores the optimizer's and the scheduler's state after ``configure_optimizers``, and with them
        the saved run's lr (resuming after a blow-up with a lower ``train.lr`` would otherwise go on at the old one).
        Each group's peak lr (``initial_lr``, the scheduler's ``base_lrs``) is set to the config's and its current lr
        to that peak times the schedule's factor at the restored step: the schedule keeps its place. Each change is
        logged. Adam's moment estimates are kept."""
        configured = getattr(self, "_configured_groups", None)
        if not configured or not self.trainer.optimizers:
            return
        optimizer = self.trainer.optimizers[0]
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        scheduler = schedulers[0] if schedulers else None
        changes = []
        for i, (group, want) in enumerate(zip(optimizer.param_groups, configured)):
            name = group.get("name", want["name"])
            peak = group.get("initial_lr", group["lr"])
            if peak != want["lr"]:
                changes.append(f"{name} lr {peak:g} -> {want['lr']:g}")
                group["initial_lr"] = want["lr"]
                if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                    scheduler.base_lrs[i] = want["lr"]
                    group["lr"] = want["lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
                else:
                    group["lr"] = want["lr"]
            for key in ("weight_decay", "betas"):
                if key not in group:
                    continue
                current = tuple(group[key]) if key == "betas" else group[key]
                if current != want[key]:
                    changes.append(f"{name} {key} {current} -> {want[key]}")
                    group[key] = want[key]
        if scheduler is not None:
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if changes and self.trainer.is_global_zero:
            log.info(
                "resumed at step %d with the config's optimizer settings, not the checkpoint's: %s",
                self.global_step,
                "; ".join(changes),
            )

    # -- validation: bits per character -----------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_bits = {n: 0.0 for n in self.val_names}
        self._val_chars = {n: 0 for n in self.val_names}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.val_names[dataloader_idx]
        self._val_bits[name] += float(score_batch(self.model, batch).sum())  # the evaluator's own scoring
        self._val_chars[name] += int(batch["chars"].sum())

    def on_validation_epoch_end(self) -> None:
        for name in self.val_names:
            # under DDP each rank scored its share of the windows: sum bits and characters over ranks
            totals = torch.tensor(
                [self._val_bits[name], self._val_chars[name]], dtype=torch.float64, device=self.device
            )
            bits, chars = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
            if chars:
                self.log(
                    f"val/{name}_bpc",
                    bits / chars,
                    prog_bar=name == "tc",
                    add_dataloader_idx=False,
                    rank_zero_only=True,
                )

    # -- checkpoints: trainable parameters + RNG, so a resumed run continues bit-for-bit ----------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
