"""Parts qlora_7b, hf_trainer, attention and vocab_padding of ``gpu_check.py``: the 7B-width recipe built from
the composed config (``bailong.stages.common.make_model``), trained by bailong's own step under Lightning, on one
tokenizer and one set of packed rows; plus the helpers gpu_check.py shares.

Each ``part_*(ctx, entry)`` fills ``entry`` (the part's node of the JSON) as it goes. ``ctx``: ``profile`` (shapes,
steps, the card emulated), ``report`` (the budget), ``tmp``, ``cuda``, ``peak_tflops``; ``prepared`` and ``model``
carry the tokenizer, rows and loaded model from one part to the next.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from common import compose_config, extended_tokenizer, save_random_llama

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.75  # bailong.plan.estimate's CUDA context: outside torch's allocator, so off its cap


def merged(*lists: list[str]) -> list[str]:
    """Hydra overrides, a later value of a key replacing an earlier one (Hydra refuses a key given twice)."""
    out: dict[str, str] = {}
    for item in (o for lst in lists for o in lst):
        out.pop(item.split("=", 1)[0], None)
        out[item.split("=", 1)[0]] = item
    return list(out.values())


def error_record(e: BaseException) -> dict:
    return {
        "type": type(e).__name__,
        "message": str(e)[:2000],
        "traceback": "".join(traceback.format_exception(e))[-3000:],
    }


def free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def prepare(ctx) -> SimpleNamespace:
    """The random base, the extended tokenizer and the packed rows, once for every 7B part (memoised, errors
    too: a base that could not be built blocks the parts after it at once)."""
    if ctx.prepared is not None:
        if isinstance(ctx.prepared, BaseException):
            raise RuntimeError(f"preparation failed in an earlier part: {type(ctx.prepared).__name__}: {ctx.prepared}")
        return ctx.prepared
    try:
        ctx.prepared = _prepare(ctx)
    except BaseException as e:
        ctx.prepared = e
        raise
    return ctx.prepared


def _prepare(ctx) -> SimpleNamespace:
    from omegaconf import OmegaConf

    from bailong.data.pretrain import PretrainDataModule
    from bailong.model.random_base import ensure_random_base

    info: dict = {}
    overrides = list(ctx.profile.model)
    started = time.perf_counter()
    if ctx.profile.tiny_base:  # CPU smoke: a small Llama with the Llama-2 tokenizer layout
        overrides = merged(overrides, [f"model.pretrained={tiny_base(ctx.tmp / 'tiny_base', ctx.profile.tiny_base)}"])
    cfg = compose_config(overrides, output_dir=ctx.tmp / "qlora_7b")
    base = ensure_random_base(cfg.model, device=ctx.profile.device)  # a no-op for the tiny base
    manifest = base / "random_base.json"
    info["base"] = {
        "path": str(base),
        "seconds": round(time.perf_counter() - started, 1),
        **(json.loads(manifest.read_text()) if manifest.is_file() else {"tiny": ctx.profile.tiny_base}),
    }
    started = time.perf_counter()
    splits, tok, ext = extended_tokenizer(cfg)
    data = PretrainDataModule.from_config(tok, OmegaConf.to_object(cfg.data), seed=cfg.seed, splits=splits)
    data.setup("fit")
    info["data"] = {
        "tokenizer_and_packing_seconds": round(time.perf_counter() - started, 1),
        "vocab_size": len(tok),
        "num_base": ext.num_base,
        "packed_rows": int(data.train_sequences.shape[0]),
        "seq_len": int(data.train_sequences.shape[1]),
    }
    return SimpleNamespace(
        cfg=cfg, overrides=overrides, tok=tok, splits=splits, data=data, num_base=ext.num_base, info=info
    )


def tiny_base(path: Path, spec: dict) -> Path:
    from bailong.model.mini_base import save_tokenizer
    from bailong.model.random_base import ROOT as BASE_ROOT
    from bailong.model.random_base import TOKENIZERS

    save_random_llama(
        path,
        hidden=spec["hidden"],
        layers=spec["layers"],
        vocab=spec["vocab"],
        intermediate=spec["intermediate"],
        heads=spec["heads"],
    )
    save_tokenizer((BASE_ROOT / TOKENIZERS["llama2"]).read_bytes(), path)
    return path


def variant_config(ctx, prep, extra: list[str]):
    return compose_config(merged(prep.overrides, extra), output_dir=ctx.tmp / "qlora_7b") if extra else prep.cfg


def build(ctx, prep, cfg):
    """``bailong.stages.common.make_model`` (what run.py trains) with random new rows; (model, description)."""
    import torch

    from bailong.model.build import count_parameters
    from bailong.model.device import run_device
    from bailong.plan import architecture
    from bailong.stages.common import make_model

    hidden, n_new = architecture(cfg.model).hidden, len(prep.tok) - prep.num_base
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = {k: torch.randn(n_new, hidden, generator=gen) * 0.02 for k in ("embed", "head")}
    started = time.perf_counter()
    model = make_model(cfg, prep.tok, prep.num_base, rows, run_device(cfg.trainer.accelerator))
    sync(ctx)
    base = model.get_base_model()
    info = {
        "seconds": round(time.perf_counter() - started, 1),
        "vocab_size": len(prep.tok),
        "embedding_rows": int(base.get_input_embeddings().weight.shape[0]),
        "head_rows": int(base.get_output_embeddings().weight.shape[0]),
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "layers": base.config.num_hidden_layers,
        "parameters": count_parameters(model),
        "allocated_gib": torch.cuda.memory_allocated() / GIB if ctx.cuda else None,
    }
    return model, info


def sync(ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def step_timer(ctx):
    """A Lightning callback: wall time of every training batch, the device synchronised at each end, so a step's
    queued kernels count in that step."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self):
            self.marks, self.positions = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not self.marks:
                sync(ctx)
                self.marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(ctx)
            self.marks.append(time.perf_counter())
            self.positions.append(int(batch["input_ids"].numel()))

        def summary(self, warmup: int) -> dict:
            steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
            timed = self.marks[-1] - self.marks[warmup]
            return {
                "steps_timed": len(steps) - warmup,
                "tokens_per_sec": sum(self.positions[warmup:]) / timed,
                "seconds_per_step": [round(s, 3) for s in steps],
            }

    return StepTimer()


def train_trial(ctx, prep, cfg, model, micro_batch: int) -> dict:
    """``warmup + timed`` steps of bailong's training step (``PretrainModule`` under the configured Lightning
    ``Trainer``, as run.py builds them) on the packed rows, at ``micro_batch`` rows per step."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from bailong.data.packing import PackedSequenceDataset
    from bailong.stages.common import module_kwargs
    from bailong.train.pretrain import PretrainModule

    class StaysOnDevice(PretrainModule):
        def cpu(self):  # Lightning's teardown moves the module to the CPU after each fit: 6 GB each way
            return self

    steps = ctx.profile.warmup + ctx.profile.timed
    rows = prep.data.train_sequences
    need = steps * micro_batch
    rows = rows.repeat(-(-need // len(rows)), 1)[:need]
    timer = step_timer(ctx)
    module = StaysOnDevice(model, **{**module_kwargs(cfg), "max_steps": steps})
    trainer = instantiate(
        cfg.trainer,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(ctx.tmp / "trainer"),
    )
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, train_dataloaders=DataLoader(PackedSequenceDataset(rows), batch_size=micro_batch))
    finally:
        for p in model.parameters():  # an OOM mid-backward leaves gradients behind
            p.grad = None
    out = timer.summary(ctx.profile.warmup)
    if ctx.cuda:
        out.update(
            peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
        )
    return out


def planned(cfg, micro_batch: int) -> dict:
    """``bailong.plan``'s prediction for this config at ``micro_batch``, and the part of it torch's allocator
    sees: not the CUDA context and slack, nor paged optimizer state (CUDA managed memory, bitsandbytes')."""
    from bailong.plan import estimate, setup_from_config

    setup = replace(setup_from_config(cfg), micro_batch=micro_batch, accumulate=1)
    plan = estimate(setup)
    optimizer = plan.components_gib.get("optimizer_state", 0.0)
    paged = setup.optimizer.startswith("paged")
    return {
        "total_gib": plan.total_gib,
        "cpu_comparable_gib": plan.cpu_comparable_gib,
        "optimizer_state_gib": optimizer,
        "optimizer_paged": paged,
        "torch_allocated_gib": plan.cpu_comparable_gib - (optimizer if paged else 0.0),
        "peak_phase": getattr(plan, "peak_phase", None),
        "rows": plan.setup.get("rows"),
        "fits": plan.fits,
    }


def flops_per_token(cfg) -> dict:
    """MFU's numerator per token: 6·N (N = projection weights + the head's matmul over the real vocabulary)
    plus causal attention, 6·layers·seq·hidden (QK^T and AV, half the square, forward + 2x backward); and what
    bailong.plan counts for this setup (frozen base: no weight gradients, + a recompute with checkpointing)."""
    from bailong.plan import architecture, setup_from_config, step_flops

    a, seq = architecture(cfg.model), cfg.data.seq_len
    n = (
        a.layers * sum(i * o for i, o in a.projection_shapes().values())
        + (a.base_vocab + cfg.tokenizer.added_vocab) * a.hidden
    )
    setup = setup_from_config(cfg)
    return {
        "model": 6 * n + 6 * a.layers * seq * a.hidden,
        "n": n,
        "planner": step_flops(replace(setup, micro_batch=1)) / seq,
    }


def try_micro_batch(ctx, prep, cfg, model, micro_batch: int) -> dict:
    """One trial: it fits unless torch raises CUDA OOM (the allocator is capped to the card emulated)."""
    import torch

    started = time.perf_counter()
    trial: dict = {"micro_batch": micro_batch, "planned": planned(cfg, micro_batch)}
    oom = None
    try:
        trial.update(fits=True, **train_trial(ctx, prep, cfg, model, micro_batch))
    except Exception as e:  # noqa: BLE001 - OOM is a result, anything else is re-raised
        if not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()):
            raise
        oom = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if oom:  # outside the except block: the exception's frames (and their tensors) are gone
        free_memory()
        trial.update(fits=False, oom=oom)
    else:
        measured = trial.get("peak_allocated_gib")
        if measured:
            trial["plan_error"] = (trial["planned"]["torch_allocated_gib"] - measured) / measured
        flops = flops_per_token(cfg)
        trial["model_tflops_per_sec"] = flops["model"] * trial["tokens_per_sec"] / 1e12
        if ctx.peak_tflops:
            trial["mfu"] = trial["model_tflops_per_sec"] / ctx.peak_tflops
            trial["planner_flops_utilization"] = flops["planner"] * trial["tokens_per_sec"] / 1e12 / ctx.peak_tflops
    trial["trial_seconds"] = round(time.perf_counter() - started, 1)
    free_memory()
    return trial


def cap_memory(ctx) -> dict | None:
    """Cap torch's allocator to the emulated card less the CUDA context: allocations past it raise OOM."""
    if not ctx.cuda or not ctx.profile.memory_gib:
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    limit = (ctx.profile.memory_gib - CUDA_CONTEXT_GIB) * GIB
    if limit < total:
        torch.cuda.set_per_process_memory_fraction(limit / total)
    return {
        "card_gib": ctx.profile.memory_gib,
        "allocator_limit_gib": min(limit, total) / GIB,
        "cuda_context_assumed_gib": CUDA_CONTEXT_GIB,
        "device_gib": total / GIB,
    }


def part_qlora(ctx, entry: dict) -> None:
    prep = prepare(ctx)
    entry.update(overrides=prep.overrides, **prep.info)
    entry["memory_cap"] = cap_memory(ctx)
    ctx.model, entry["model"] = build(ctx, prep, prep.cfg)
    entry["flops_per_token"] = flops_per_token(prep.cfg)
    entry["notes"] = {
        "mfu": "(6*N + 6*layers*seq*hidden) * tokens_per_sec / device.peak_bf16_tflops; N = projection weights + "
        "vocab*hidden (the head's matmul); planner_flops_utilization uses bailong.plan.step_flops instead",
        "memory": "peak_allocated_gib = torch.cuda.max_memory_allocated over the trial, model included; compare "
        "with planned.torch_allocated_gib (the plan less CUDA context, allocator slack and paged "
        "optimizer state, which live outside torch's allocator); fits = no CUDA OOM under memory_cap",
        "tokens_per_sec": "every position of the timed steps (warm-up excluded), device synchronised per step",
    }
    later = sum(
        ctx.profile.needs_s[p] for p in ("hf_trainer", "attention", "vocab_padding") if p in ctx.report.selected
    )
    deadline = time.monotonic() + min(ctx.profile.search_s, ctx.report.remaining() - later)
    trials = entry["micro_batches"] = []
    fits, fails, stop, micro_batch = 0, None, None, 1
    while True:
        last = next((t for t in reversed(trials) if t["fits"]), None)
        if micro_batch > ctx.profile.max_micro_batch:
            stop = f"reached --max-micro-batch {ctx.profile.max_micro_batch} without running out of memory"
            break
        if last and time.monotonic() + last["trial_seconds"] * micro_batch / last["micro_batch"] > deadline:
            stop = f"time budget: micro-batch {micro_batch} would end after the search's deadline"
            break
        trial = try_micro_batch(ctx, prep, prep.cfg, ctx.model, micro_batch)
        trials.append(trial)
        ctx.report.write()
        if trial["fits"]:
            fits = micro_batch
            if micro_batch == 1:
                entry["micro_batch_1"] = trial
        else:
            fails = micro_batch
        if fits == 0:
            raise RuntimeError(f"micro-batch 1 does not fit in {ctx.profile.memory_gib} GiB: {trial.get('oom')}")
        if fails is None:
            micro_batch *= 2
        elif fails - fits > 1:
            micro_batch = (fits + fails) // 2
        else:
            stop = f"bracketed: micro-batch {fits} fits, {fails} runs out of memory"
            break
    entry["largest"] = next(t for t in trials if t["micro_batch"] == fits)
    entry["search"] = stop


def part_hf(ctx, entry: dict) -> None:
    """train_throughput's hf_packed side on the model part qlora_7b loaded, micro-batch 1."""
    import torch

    from train_throughput import run_hf

    prep = prepare(ctx)
    reference = ctx.report.data["parts"]["qlora_7b"].get("micro_batch_1")
    forced = {"bf16": True} if str(prep.cfg.trainer.precision).startswith("bf16") else {}
    if ctx.cuda:
        forced["use_cpu"] = False  # run_hf is written for the CPU benchmark
        torch.cuda.reset_peak_memory_stats()
    entry["training_arguments_forced"] = forced
    with training_arguments(**forced):
        clock = run_hf(
            prep.cfg,
            prep.tok,
            prep.splits,
            prep.data,
            ctx.model,
            ctx.profile.warmup + ctx.profile.timed,
            packed=True,
            work=ctx.tmp / "hf",
        )
    hf = clock.summary(ctx.profile.warmup)
    if ctx.cuda:
        hf.update(
            peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
        )
    entry["hf_packed"] = hf
    if reference:
        entry["bailong_micro_batch_1"] = {k: reference.get(k) for k in ("tokens_per_sec", "peak_allocated_gib")}
        entry["ratio_bailong_over_hf"] = reference["tokens_per_sec"] / hf["positions_per_sec"]
    entry["note"] = (
        f"hf_packed: transformers Trainer on the same packed rows, torch AdamW (run_hf's), loss from "
        f"the model's full logits; bailong: PretrainModule, {prep.cfg.train.optimizer}, fused chunked "
        f"loss. Ratio of positions per second, micro-batch 1"
    )


@contextmanager
def training_arguments(**forced):
    """Every ``transformers.TrainingArguments`` made inside takes ``forced`` values (run_hf builds its own for the
    CPU). Set before ``__post_init__``, which validates them; patching the module's name instead is not seen by
    ``from transformers import TrainingArguments`` once transformers' lazy module has resolved it."""
    from transformers import TrainingArguments

    original = TrainingArguments.__post_init__

    def post_init(self):
        for key, value in forced.items():
            setattr(self, key, value)
        original(self)

    TrainingArguments.__post_init__ = post_init
    try:
        yield
    finally:
        TrainingArguments.__post_init__ = original


def release_model(ctx) -> None:
    ctx.model = None
    free_memory()


def part_variants(ctx, entry: dict, part: str, key: str, variants: dict[str, tuple[str, str | None]]) -> None:
    """Each variant built from the config with one override and trained at micro-batch 1, against qlora_7b's
    micro-batch-1 trial (the reference: the recipe's own setting). ``variants``: name -> (override, why skipped)."""
    release_model(ctx)
    prep = prepare(ctx)
    reference = ctx.report.data["parts"]["qlora_7b"].get("micro_batch_1")
    entry["reference"] = {
        key: prep.cfg.model[key],
        **(
            {k: reference.get(k) for k in ("tokens_per_sec", "peak_allocated_gib")}
            if reference
            else {"missing": "qlora_7b did not run micro-batch 1"}
        ),
    }
    entry["variants"] = {}
    for name, (override, skip) in variants.items():
        v = entry["variants"][name] = {"override": override}
        needs = ctx.profile.needs_s[part]
        if skip or ctx.report.remaining() < needs:
            v.update(status="skipped", reason=skip or f"time budget: {ctx.report.remaining():.0f} s left")
            continue
        started, model = time.perf_counter(), None
        try:
            cfg = variant_config(ctx, prep, [override])
            model, v["model"] = build(ctx, prep, cfg)
            v.update(try_micro_batch(ctx, prep, cfg, model, 1))  # an OOM is a result: fits false, the message
            if reference and v.get("fits"):
                v["ratio_over_reference"] = v["tokens_per_sec"] / reference["tokens_per_sec"]
            v["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one variant's failure is recorded, the next runs
            v.update(status="error", error=error_record(e))
        finally:
            model = None  # before the next variant loads its own
        v["seconds"] = round(time.perf_counter() - started, 1)
        free_memory()
        ctx.report.write()
    failed = [n for n, v in entry["variants"].items() if v["status"] == "error"]
    if failed:
        raise RuntimeError(f"variant(s) failed: {', '.join(failed)} (each one's error is under variants)")


def flash_attention_skip(ctx) -> str | None:
    if not ctx.cuda:
        return "needs CUDA"
    from transformers.utils import is_flash_attn_2_available

    return None if is_flash_attn_2_available() else "flash-attn is not installed (transformers cannot import it)"


def part_attention(ctx, entry: dict) -> None:
    part_variants(
        ctx,
        entry,
        "attention",
        "attn_implementation",
        {
            "eager": ("model.attn_implementation=eager", None),
            "flash_attention_2": ("model.attn_implementation=flash_attention_2", flash_attention_skip(ctx)),
        },
    )


def part_padding(ctx, entry: dict) -> None:
    part_variants(
        ctx,
        entry,
        "vocab_padding",
        "pad_vocab_to_multiple_of",
        {"unpadded": ("model.pad_vocab_to_multiple_of=1", None)},
    )
