"""Training throughput and peak memory: bailong's training step against the standard QLoRA recipe.

    python benchmarks/train_throughput.py                 # both models, three sides each (~6 min at 1 thread)
    python benchmarks/train_throughput.py --models mini --steps 4

Every side trains the same 4-bit NF4 model with the same LoRA (``build_model`` with the run's config:
r16 on every projection, the 8,000 new embedding/head rows trainable), the same optimizer (AdamW,
lr 2e-4, warm-up + cosine, clipping at 1.0), sequence length and sequences per step, in its own
subprocess so each side's peak RSS is its own:

- ``bailong``: ``PretrainModule`` + ``PretrainDataModule`` under a Lightning ``Trainer`` built from
  ``conf/trainer`` as run.py builds it: packed sequences, chunked cross-entropy;
- ``hf_padded``: the standard recipe, transformers ``Trainer`` on one document per row, truncated to
  the sequence length and padded per batch (``DataCollatorForLanguageModeling``, pad = unk), loss from
  the model's full logits;
- ``hf_packed``: transformers ``Trainer`` on bailong's packed rows: the same tokens per step, so the
  ratio to it is the training step alone (chunked loss, Lightning loop) without the packing gain.

``tokens_per_sec`` counts scored tokens (labels not -100) per second of optimizer steps after
``--warmup`` steps; padding is not counted. ``positions_per_sec`` counts every position fed.
Models: ``mini`` (the embedded base, vocabulary 5,000 + 8,000 appended) and ``large`` (a random
Llama, hidden 1024, 8 layers, vocabulary 40,000 + 8,000 appended = 48k, saved as safetensors and
loaded in 4-bit through the same code path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    compose_config,
    extended_tokenizer,
    machine,
    matmul_flops,
    peak_rss_mib,
    reset_peak_rss,
    run_worker,
    save_random_llama,
    window_peak_rss_mib,
)

SIDES = ("bailong", "hf_padded", "hf_packed")
MODELS = {
    # sequences per step x tokens: the run's default (data.batch_size 8 x data.seq_len 256) on the mini base;
    # 4 x 256 on the large one keeps each side to about a minute on one thread
    "mini": {"batch_size": 8, "seq_len": 256},
    "large": {
        "batch_size": 4,
        "seq_len": 256,
        "hidden": 1024,
        "layers": 8,
        "heads": 16,
        "intermediate": 2816,
        "base_vocab": 40_000,
        "added": 8_000,
    },
}


# -- worker: one side, one model, in its own process -------------------------------------------------
class StepClock:
    """Wall time of each optimizer step and the tokens its forward saw (a forward pre-hook counts them)."""

    def __init__(self, model):
        self.seconds: list[float] = []
        self.scored: list[int] = []
        self.positions: list[int] = []
        self._t0 = 0.0
        if model is not None:
            model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        labels = kwargs.get("labels")
        ids = kwargs.get("input_ids")
        if labels is not None and ids is not None and module.training:
            self.scored.append(int((labels[:, 1:] != -100).sum()))
            self.positions.append(int(ids.numel()))

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        self.seconds.append(time.perf_counter() - self._t0)

    def summary(self, warmup: int) -> dict:
        n = len(self.seconds)
        secs, scored, pos = self.seconds[warmup:], self.scored[warmup:n], self.positions[warmup:n]
        return {
            "steps_timed": len(secs),
            "seconds_per_step_median": round(statistics.median(secs), 3),
            "tokens_per_sec": round(sum(scored) / sum(secs), 1),
            "positions_per_sec": round(sum(pos) / sum(secs), 1),
            "scored_tokens_per_step": round(sum(scored) / len(secs), 1),
        }


def build(model_name: str, work: Path):
    """The run's config, tokenizer, data module and 4-bit LoRA model for ``model_name``."""
    import torch

    from bailong.data.pretrain import PretrainDataModule
    from bailong.model.build import build_model

    spec = MODELS[model_name]
    cfg = compose_config(
        [f"data.batch_size={spec['batch_size']}", f"data.seq_len={spec['seq_len']}"], str(work / "run")
    )
    splits, tok, ext = extended_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    if model_name == "mini":
        pretrained, num_base, vocab = cfg.model.pretrained, ext.num_base, len(tok)
    else:  # a random Llama at larger shapes; the mini tokenizer's ids are a subset of its vocabulary
        pretrained = str(
            save_random_llama(
                work / "large",
                hidden=spec["hidden"],
                layers=spec["layers"],
                vocab=spec["base_vocab"],
                intermediate=spec["intermediate"],
                heads=spec["heads"],
            )
        )
        num_base, vocab = spec["base_vocab"], spec["base_vocab"] + spec["added"]
    hidden = spec.get("hidden", 256)
    rows = {"embed": torch.randn(vocab - num_base, hidden) * 0.02, "head": torch.randn(vocab - num_base, hidden) * 0.02}
    model = build_model(
        dataclasses.replace(OmegaConf.to_object(cfg.model), pretrained=str(pretrained)),
        vocab_size=vocab,
        num_base=num_base,
        rows=rows,
        quant=OmegaConf.to_object(cfg.quant),
        lora=OmegaConf.to_object(cfg.lora),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )
    data = PretrainDataModule.from_config(tok, OmegaConf.to_object(cfg.data), seed=cfg.seed, splits=splits)
    return cfg, tok, splits, data, model


def run_bailong(cfg, data, model, steps: int, work: Path) -> StepClock:
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from bailong.stages.common import module_kwargs
    from bailong.train.pretrain import PretrainModule

    clock = StepClock(None)

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.scored.append(int((batch["labels"][:, 1:] != -100).sum()))  # the forward hook never fires:
            clock.positions.append(int(batch["input_ids"].numel()))  # the loss calls decoder and head directly
            clock.start()

        def on_train_batch_end(self, *args):
            clock.stop()

    module = PretrainModule(model, **{**module_kwargs(cfg), "max_steps": steps})  # as run.py configures it
    trainer = instantiate(
        cfg.trainer,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[Clock()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(work),
    )
    trainer.fit(module, datamodule=data)
    return clock


def run_hf(cfg, tok, splits, data, model, steps: int, packed: bool, work: Path) -> StepClock:
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from bailong.data.packing import PackedSequenceDataset, tokenize_documents

    clock = StepClock(model)

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            clock.start()

        def on_step_end(self, *args, **kwargs):
            clock.stop()

    if packed:
        dataset, collator = PackedSequenceDataset(data.train_sequences), None
    else:  # one document per row, BOS + text + EOS cut at seq_len, in the epoch's TC/EN mix order
        bos, eos = tok.bos_token_id, tok.eos_token_id
        order = data.mix.docs
        texts = {"tc": splits.tc_train, "en": splits.en_train}
        wanted = [texts[lang][i] for lang, i in order[: (steps + 1) * cfg.data.batch_size * 4]]
        ids = tokenize_documents(tok, wanted)
        dataset = [{"input_ids": [bos, *x.tolist(), eos][: cfg.data.seq_len]} for x in ids]
        tok.pad_token = tok.unk_token  # the QLoRA recipe's pad; the collator sets its labels to -100
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=cfg.data.batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        adam_beta1=cfg.train.betas[0],
        adam_beta2=cfg.train.betas[1],
        warmup_steps=cfg.train.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=cfg.trainer.gradient_clip_val,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=cfg.seed,
        disable_tqdm=True,
    )
    torch.manual_seed(cfg.seed)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Clock()]).train()
    return clock


def worker(side: str, model_name: str, steps: int, warmup: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg, tok, splits, data, model = build(model_name, work)
        data.setup("fit")
        rss_before = peak_rss_mib()
        windowed = reset_peak_rss()  # the training window's own peak, apart from loading's
        if side == "bailong":
            clock = run_bailong(cfg, data, model, steps, work)
        else:
            clock = run_hf(cfg, tok, splits, data, model, steps, packed=side == "hf_packed", work=work)
        config = model.get_base_model().config
        training_peak = window_peak_rss_mib() if windowed else None
    return {
        "peak_rss_training_mib": training_peak and round(training_peak, 1),
        "side": side,
        "model": model_name,
        **clock.summary(warmup),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_before_training_mib": round(rss_before, 1),
        "torch_threads": torch.get_num_threads(),
        "train_flops_per_token": train_flops_per_token(config, cfg.data.seq_len),
    }


def train_flops_per_token(config, seq_len: int) -> float:
    """Useful FLOPs per trained token with a frozen base: forward (2 x weights of every projection and the head,
    plus causal attention) and the backward to the inputs (the same again); LoRA's and the new rows' own
    weight gradients are small and left out. Recomputation (chunked loss, checkpointing) is not counted."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    projections = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    forward = 2 * (projections + h * v) + 2 * layers * seq_len * h  # attention: QK^T and AV over half the window
    return float(2 * forward)


# -- parent: every side of every model, then the ratios ------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default: mini 8, large 5)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the sides round-robin this many times and keep each side's fastest run "
        "(the CPU is shared: load from other processes slows whichever side it hits)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, model_name = args.worker
        print(json.dumps(worker(side, model_name, args.steps, args.warmup)))
        return

    script = Path(__file__).resolve()
    result = {
        "benchmark": "train_throughput",
        "machine": machine(),
        "matmul_flops_per_sec": {d: round(matmul_flops(d) / 1e9, 1) for d in ("float32", "bfloat16")},
        "units": {"matmul_flops_per_sec": "GFLOP/s", "achieved": "GFLOP/s"},
        "models": {},
    }
    for model_name in args.models:
        steps = args.steps or (8 if model_name == "mini" else 5)
        sides: dict[str, dict] = {}
        for _ in range(args.repeats):
            for side in args.sides:
                run = run_worker(
                    script,
                    ["--worker", side, model_name, "--steps", str(steps), "--warmup", str(args.warmup)],
                    timeout=1800,
                )
                per_token = run.pop("train_flops_per_token")
                run["achieved_gflops_per_sec"] = round(per_token * run["positions_per_sec"] / 1e9, 1)
                run["tokens_per_sec_all_repeats"] = sides.get(side, {}).get("tokens_per_sec_all_repeats", []) + [
                    run["tokens_per_sec"]
                ]
                if side not in sides or run["tokens_per_sec"] > sides[side]["tokens_per_sec"]:
                    sides[side] = run
                else:
                    sides[side]["tokens_per_sec_all_repeats"] = run["tokens_per_sec_all_repeats"]
        entry = {"spec": MODELS[model_name], "train_flops_per_token": per_token, "sides": sides}
        if "bailong" in sides:
            b = sides["bailong"]
            peak = result["matmul_flops_per_sec"]["bfloat16"]
            entry["bailong_achieved_over_bf16_matmul"] = round(b["achieved_gflops_per_sec"] / peak, 3)
            for other in ("hf_padded", "hf_packed"):
                if other in sides:
                    speed = b["tokens_per_sec"] / sides[other]["tokens_per_sec"]
                    entry[f"tokens_per_sec_ratio_vs_{other}"] = round(speed, 2)
                    entry[f"peak_rss_ratio_vs_{other}"] = round(b["peak_rss_mib"] / sides[other]["peak_rss_mib"], 2)
                    if b.get("peak_rss_training_mib") and sides[other].get("peak_rss_training_mib"):
                        entry[f"training_peak_rss_ratio_vs_{other}"] = round(
                            b["peak_rss_training_mib"] / sides[other]["peak_rss_training_mib"], 2
                        )
        result["models"][model_name] = entry
    result["machine"]["load_average_1m_end"] = machine()["load_average_1m"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
