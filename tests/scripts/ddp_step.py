"""One DDP training step of the project's PretrainModule on CPU (gloo), 2 processes; each rank dumps the
batch it saw and its gradients after DDP's all-reduce (tests/test_ddp.py compares them).

    python tests/scripts/ddp_step.py OUT_DIR

Lightning's DDP launcher re-runs this script for rank 1, as it re-runs run.py under trainer=ddp.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bailong.model.build import build_model  # noqa: E402
from bailong.model.config import LoraConfig, ModelConfig, QuantConfig  # noqa: E402
from bailong.train.pretrain import PretrainModule  # noqa: E402

NUM_BASE, NEW_ROWS, SEQ = 5000, 16, 32


def make_model():
    """The mini base, unquantised, + LoRA r4 (no dropout: ranks must compute the same function) + 16 new rows."""
    g = torch.Generator().manual_seed(0)
    rows = {k: torch.randn(NEW_ROWS, 256, generator=g) * 0.02 for k in ("embed", "head")}
    torch.manual_seed(0)  # LoRA's A matrices
    return build_model(
        ModelConfig(name="bench", pad_vocab_to_multiple_of=1, pretrained=str(ROOT / "models" / "mini-base")),
        vocab_size=NUM_BASE + NEW_ROWS,
        num_base=NUM_BASE,
        rows=rows,
        quant=QuantConfig(name="none"),
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
    )


def batches() -> list[dict[str, torch.Tensor]]:
    """Two different rows (the distributed sampler gives one to each rank), new token ids included."""
    ids = torch.randint(0, NUM_BASE + NEW_ROWS, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ids[:, ::4] = NUM_BASE + torch.arange(SEQ // 4) % NEW_ROWS
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class DumpGradients(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch["input_ids"].clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # after backward + all-reduce
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save(
            {
                "grads": grads,
                "batch": self.batch,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    module = PretrainModule(make_model(), lr=1e-3, max_steps=1, warmup_steps=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=pl.strategies.DDPStrategy(process_group_backend="gloo"),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=None,
        callbacks=[DumpGradients(out)],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches(), batch_size=1, shuffle=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
