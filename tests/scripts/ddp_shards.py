"""Lightning reading the project's token-shard stream on CPU processes (gloo): each rank dumps the rows it trained on,
step by step (tests/test_prepare.py checks the ranks' shares and a resume on another number of ranks).

    python tests/scripts/ddp_shards.py OUT DEVICES BATCH STEPS [CKPT]

A trivial one-parameter module stands in for the model: what is tested is which rows reach each rank. With CKPT the
run resumes from that checkpoint (written by a run of this script, which saves one at step STEPS // 2).
Lightning's DDP launcher re-runs this script for the other ranks, as it re-runs run.py under trainer=ddp.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bailong.data.config import CorpusConfig  # noqa: E402
from bailong.data.corpus import load_documents  # noqa: E402
from bailong.data.pretrain import PretrainDataModule  # noqa: E402
from bailong.tokenization.extend import load_tokenizer  # noqa: E402


def datamodule(cache: Path, batch_size: int) -> PretrainDataModule:
    tc = load_documents([CorpusConfig(path=str(ROOT / "data/zh_tw/poetry_tang.jsonl.gz"), max_docs=400)])
    en = load_documents([CorpusConfig(path=str(ROOT / "data/en/fortunes.jsonl.gz"), max_docs=400)])
    tok = load_tokenizer(ROOT / "models" / "mini-base")
    return PretrainDataModule(
        tok, tc, en, tc[:2], en[:2], seq_len=32, batch_size=batch_size, tc_ratio=0.8, seed=3, cache_dir=cache
    )


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w * batch["input_ids"].float().mean() * 1e-4) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main(out: Path, devices: int, batch_size: int, steps: int, ckpt: str | None) -> None:
    torch.set_num_threads(1)
    module = Recorder()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=steps // 2, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=pl.strategies.DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule(out / "cache", batch_size)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    # the data module's epoch figures are per rank, as the loader Lightning built counts them
    assert trainer.num_training_batches == dm.train_batches_per_epoch, (
        trainer.num_training_batches,
        dm.train_batches_per_epoch,
    )
    torch.save(torch.stack(module.seen), out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5] if len(sys.argv) > 5 else None,
    )
