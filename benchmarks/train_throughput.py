"""Training throughput and peak memory: bailong's training step against transformers Trainer + peft.

    python benchmarks/train_throughput.py                        # both models, both precisions, 3 repeats
    python benchmarks/train_throughput.py --models mini --precisions bf16 --repeats 1 --steps 4

Every side trains the same 4-bit NF4 model with the same LoRA (``build_model`` with the run's config:
r16 on every projection, the 8,000 new embedding/head rows trainable), the same optimizer (AdamW,
lr 2e-4, warm-up + cosine, clipping at 1.0), sequence length, sequences per step and precision (``fp32``:
the run's default, ``trainer.precision=32-true``; ``bf16``: ``trainer.precision=bf16-mixed model.dtype=bfloat16``,
autocast with the base's own weights in bfloat16, ``TrainingArguments(bf16=True)`` for the Trainer), each in its
own subprocess so each side's peak memory is its own:

- ``bailong``: ``PretrainModule`` + ``PretrainDataModule`` under a Lightning ``Trainer`` built from
  ``conf/trainer`` as run.py builds it: packed rows, the fused chunked cross-entropy;
- ``hf_packed`` (**the baseline**): transformers ``Trainer`` on bailong's packed rows, loss from the model's full
  logits. Packing is the standard recipe for pre-training (LLaMA-Factory, axolotl and transformers' ``run_clm``
  all pack), so the ratio to it is bailong's own gain;
- ``hf_padded``: transformers ``Trainer`` on one document per row, truncated to the sequence length and padded
  per batch (``DataCollatorForLanguageModeling``, pad = unk): ``hf_packed / hf_padded`` is what packing gives;
- ``hf_liger`` (CUDA only, with ``liger-kernel`` installed): ``hf_packed`` with ``use_liger_kernel=True``, whose
  fused linear cross-entropy never builds the full logits either: the strongest baseline. Left out, with the
  reason in the JSON, where there is no GPU.
- ``head_free``: bailong's step with the head and the loss costing nothing (the loss is the mean of the decoder's
  output). What is left is the decoder, its backward and the optimizer, which every side runs alike, so
  ``hf_packed`` over it bounds what any change to bailong's head and loss could reach; ``head_at_ceiling`` adds
  the head's own FLOPs at the matmul rate of its dtype: the bound for a head whose matmuls run at this machine's
  measured peak; ``fraction_of_ceiling_at_most`` is the fraction of the ceiling (below) such a step would reach.

``--repeats`` runs the sides round-robin; each ratio is the median over repeats of the ratio within one round
(paired: load from other processes hits both sides of a pair alike), and each side's figures are its median.
``tokens_per_sec`` counts scored tokens (labels not -100) per second of optimizer steps after ``--warmup``
steps; padding is not counted. ``positions_per_sec`` counts every position fed.

The **ceiling** is the tokens/s this machine would reach if every useful FLOP of a step (``step_flops``) ran at
the matmul rate measured here for the dtype it runs in: the 4-bit projections in ``quant.compute_dtype``,
attention and the head in the activations' dtype (bfloat16 under ``bf16-mixed``, else ``model.dtype``).
``fraction_of_ceiling`` is achieved positions/s over it.

Models: ``mini`` (the embedded base, vocabulary 5,000 + 8,000 appended) and ``large`` (a random Llama, hidden
1024, 8 layers, vocabulary 40,000 + 8,000 appended = 48k, saved as safetensors and loaded in 4-bit through the
same code path).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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

SIDES = ("bailong", "hf_packed", "hf_padded", "hf_liger", "head_free")
BASELINE = "hf_packed"
# each precision as the config asks for it: bf16 = autocast and the base's own weights in bfloat16 (activations in
# bfloat16 end to end); fp32 = the run's default on the mini base
PRECISIONS = {
    "fp32": ("trainer.precision=32-true",),
    "bf16": ("trainer.precision=bf16-mixed", "model.dtype=bfloat16"),
}
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


def build(model_name: str, work: Path, overrides: list[str]):
    """The run's config (plus ``overrides``), tokenizer, data module and 4-bit LoRA model for ``model_name``."""
    import torch

    from bailong.data.pretrain import PretrainDataModule
    from bailong.model.build import build_model

    spec = MODELS[model_name]
    cfg = compose_config(
        [f"data.batch_size={spec['batch_size']}", f"data.seq_len={spec['seq_len']}", *overrides], str(work / "run")
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


def run_bailong(cfg, data, model, steps: int, work: Path, head_free: bool = False) -> StepClock:
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from bailong.stages.common import module_kwargs
    from bailong.train.loss import decoder_hidden_states
    from bailong.train.pretrain import PretrainModule

    class HeadFreeModule(PretrainModule):
        """The same step with a loss that costs nothing: the decoder's output, averaged."""

        def training_step(self, batch, batch_idx):
            ids, mask, positions = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
            return decoder_hidden_states(self.model, ids, mask, positions).float().mean()

    clock = StepClock(None)

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.scored.append(int((batch["labels"][:, 1:] != -100).sum()))  # the forward hook never fires:
            clock.positions.append(int(batch["input_ids"].numel()))  # the loss calls decoder and head directly
            clock.start()

        def on_train_batch_end(self, *args):
            clock.stop()

    module_class = HeadFreeModule if head_free else PretrainModule
    module = module_class(model, **{**module_kwargs(cfg), "max_steps": steps})  # as run.py configures it
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


def run_hf(cfg, tok, splits, data, model, steps: int, packed: bool, work: Path, liger: bool = False) -> StepClock:
    """transformers ``Trainer`` on the same model: packed rows or padded documents, at the run's precision."""
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
    else:  # one document per row, BOS + text + EOS cut at seq_len, TC/EN interleaved as the stream mixes rows
        bos, eos = tok.bos_token_id, tok.eos_token_id
        needed = (steps + 1) * cfg.data.batch_size * 4
        texts = {lang: itertools.cycle(splits.train_documents(lang)) for lang in ("tc", "en")}
        wanted = [next(texts[data.stream.source(g)[0]]) for g in range(needed)]
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
        optim="adamw_torch_fused",  # transformers' default with torch >= 2.8; bailong's adamw is fused too
        use_cpu=not torch.cuda.is_available(),
        bf16=str(cfg.trainer.precision) == "bf16-mixed",
        use_liger_kernel=liger,
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


def liger_unavailable() -> str | None:
    """Why the Liger side cannot run here, or ``None`` when it can (Liger's kernels are Triton: CUDA only)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Liger's kernels are Triton)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def worker(side: str, model_name: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    import os

    import torch

    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg, tok, splits, data, model = build(model_name, work, overrides)
        data.setup("fit")
        rss_before = peak_rss_mib()
        windowed = reset_peak_rss()  # the training window's own peak, apart from loading's
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if side in ("bailong", "head_free"):
            clock = run_bailong(cfg, data, model, steps, work, head_free=side == "head_free")
        else:
            packed = side != "hf_padded"
            clock = run_hf(cfg, tok, splits, data, model, steps, packed=packed, work=work, liger=side == "hf_liger")
        config = model.get_base_model().config
        training_peak = window_peak_rss_mib() if windowed else None
    result = {
        "peak_rss_training_mib": training_peak and round(training_peak, 1),
        "side": side,
        "model": model_name,
        **clock.summary(warmup),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_before_training_mib": round(rss_before, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": [load_at_start, round(os.getloadavg()[0], 2)],
        "step_flops": step_flops(config, cfg),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def step_flops(config, cfg) -> dict[str, dict]:
    """Useful FLOPs per trained position with a frozen base, by where they run: ``{part: {flops, dtype}}``.

    Forward (2 x the weights of every projection and of the head, plus causal attention over half the window)
    and the backward to the inputs (the same again); LoRA's and the new rows' own weight gradients are small
    and left out, and so is recomputation (chunked loss, checkpointing). The 4-bit projections run in
    ``quant.compute_dtype``; attention and the head in the activations' dtype."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    activations = "bfloat16" if str(cfg.trainer.precision) == "bf16-mixed" else cfg.model.dtype
    projections = cfg.quant.compute_dtype if cfg.quant.name == "nf4" else activations  # Linear4bit computes so
    return {
        "projections": {"flops": 2 * 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * i), "dtype": projections},
        "attention": {"flops": 2 * 2 * layers * cfg.data.seq_len * h, "dtype": activations},
        "head": {"flops": 2 * 2 * h * v, "dtype": activations},
    }


def ceiling(parts: dict[str, dict], rates: dict[str, float]) -> dict:
    """Positions/s if every part's FLOPs ran at this machine's measured matmul rate for its dtype."""
    seconds = sum(p["flops"] / rates[p["dtype"]] for p in parts.values())
    return {
        "flops_per_position": sum(p["flops"] for p in parts.values()),
        "dtypes": {name: p["dtype"] for name, p in parts.items()},
        "positions_per_sec": round(1 / seconds, 1),
    }


# -- parent: every side of every model, then the ratios ------------------------------------------------
def parts_of(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """The model's FLOPs per position by part (the same for every side: one model, one config)."""
    return next(iter(runs.values()))[0]["step_flops"]


def head_bounds(runs: dict[str, list[dict]], parts: dict[str, dict], rates: dict[str, float]) -> dict:
    """``hf_packed``'s step time over ``head_free``'s, per round then the median (``head_free``: the head costs
    nothing), and over ``head_free``'s plus the head's FLOPs at the measured rate of its dtype (``head_at_ceiling``);
    the ceiling's step time over the latter (``fraction_of_ceiling_at_most``)."""
    head = parts["head"]["flops"] / rates[parts["head"]["dtype"]]  # seconds per position
    ideal = 1 / ceiling(parts, rates)["positions_per_sec"]
    free, at_ceiling, most = [], [], []
    for base, bound in zip(runs[BASELINE], runs["head_free"]):
        base_s, free_s = 1 / base["positions_per_sec"], 1 / bound["positions_per_sec"]
        free.append(base_s / free_s)
        at_ceiling.append(base_s / (free_s + head))
        most.append(ideal / (free_s + head))  # a step is at least the head-free step plus the head at its rate
    return {
        "head_free": round(statistics.median(free), 3),
        "head_free_each_round": [round(r, 3) for r in free],
        "head_at_ceiling": round(statistics.median(at_ceiling), 3),
        "fraction_of_ceiling_at_most": round(statistics.median(most), 3),
    }


def peak_memory(run: dict) -> float:
    """The figure sides are compared on: CUDA peak on a GPU, else the training window's peak RSS."""
    return run.get("peak_cuda_mib") or run.get("peak_rss_training_mib") or run["peak_rss_mib"]


def paired(runs: dict[str, list[dict]], a: str, b: str) -> dict:
    """``a / b`` within each round-robin round, then the median: tokens/s and peak memory."""
    speed = [x["tokens_per_sec"] / y["tokens_per_sec"] for x, y in zip(runs[a], runs[b])]
    memory = [peak_memory(x) / peak_memory(y) for x, y in zip(runs[a], runs[b])]
    return {
        "tokens_per_sec": round(statistics.median(speed), 3),
        "tokens_per_sec_each_round": [round(r, 3) for r in speed],
        "peak_memory": round(statistics.median(memory), 3),
    }


def side_summary(runs: list[dict]) -> dict:
    """One side's medians over the rounds, and every round's tokens/s, peak memory and load."""
    return {
        "tokens_per_sec": round(statistics.median(r["tokens_per_sec"] for r in runs), 1),
        "positions_per_sec": round(statistics.median(r["positions_per_sec"] for r in runs), 1),
        "seconds_per_step_median": round(statistics.median(r["seconds_per_step_median"] for r in runs), 3),
        "peak_memory_mib": round(statistics.median(peak_memory(r) for r in runs), 1),
        "rounds": [
            {k: r.get(k) for k in ("tokens_per_sec", "peak_rss_training_mib", "peak_cuda_mib", "load_average_1m")}
            for r in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default: mini 8, large 5)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds over the sides (median of them)")
    parser.add_argument("--override", action="append", default=[], help="a run.py override for every side (repeatable)")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, model_name = args.worker
        print(json.dumps(worker(side, model_name, args.steps, args.warmup, args.override)))
        return

    script = Path(__file__).resolve()
    rates = {d: matmul_flops(d) for d in ("float32", "bfloat16")}
    result = {
        "benchmark": "train_throughput",
        "machine": machine(),
        "matmul_gflops_per_sec": {d: round(r / 1e9, 1) for d, r in rates.items()},
        "baseline": BASELINE,
        "runs": {},
    }
    skipped = {"hf_liger": liger_unavailable()} if "hf_liger" in args.sides else {}
    sides = [s for s in args.sides if not skipped.get(s)]
    for model_name in args.models:
        for precision in args.precisions:
            steps = args.steps or (8 if model_name == "mini" else 5)
            overrides = [*PRECISIONS[precision], *args.override]
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for _ in range(args.repeats):
                for side in sides:
                    command = ["--worker", side, model_name, "--steps", str(steps), "--warmup", str(args.warmup)]
                    runs[side].append(run_worker(script, command + [f"--override={o}" for o in overrides], 1800))
            entry = {
                "spec": MODELS[model_name],
                "precision": precision,
                "steps": steps,
                "timed_steps": steps - args.warmup,
                "repeats": args.repeats,
                "sides": {side: side_summary(r) for side, r in runs.items()},
                "skipped": {s: why for s, why in skipped.items() if why},
            }
            if "bailong" in runs:
                parts = parts_of(runs)
                top = ceiling(parts, rates)
                achieved = entry["sides"]["bailong"]["positions_per_sec"]
                entry["ceiling"] = top
                entry["fraction_of_ceiling"] = round(achieved / top["positions_per_sec"], 3)
                others = [o for o in runs if o not in ("bailong", "head_free")]
                entry["ratios"] = {f"bailong_vs_{o}": paired(runs, "bailong", o) for o in others}
            if "head_free" in runs and BASELINE in runs:  # the most a change to the head and loss could give
                entry["bound_vs_hf_packed"] = head_bounds(runs, parts_of(runs), rates)
            if "hf_packed" in runs and "hf_padded" in runs:  # what packing alone gives the standard recipe
                entry.setdefault("ratios", {})["packing_gain_hf_packed_vs_hf_padded"] = paired(
                    runs, "hf_packed", "hf_padded"
                )
            if "bailong_vs_hf_packed" in entry.get("ratios", {}):
                vs = entry["ratios"]["bailong_vs_hf_packed"]
                entry["targets"] = {
                    "speed_vs_packed_trainer_at_least_1.5x": vs["tokens_per_sec"] >= 1.5,
                    "peak_memory_at_most_packed_trainer": vs["peak_memory"] <= 1.0,
                    "fraction_of_ceiling_at_least_0.85": entry["fraction_of_ceiling"] >= 0.85,
                }
            result["runs"][f"{model_name}/{precision}"] = entry
    result["machine"]["load_average_1m_end"] = machine()["load_average_1m"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
