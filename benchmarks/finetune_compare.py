"""QLoRA against 16-bit LoRA against full fine-tuning: time per step, peak memory, trainable parameters and
bits per character after the same steps — the paper's first comparison, measured on this machine.

    # 15-25 min at one thread, depending on the load; JSON to stdout, <out>.json and <out>.md
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python benchmarks/finetune_compare.py \
        --out benchmarks/results/finetune_compare
    python benchmarks/finetune_compare.py --models mini --steps 10 --qlora-lrs 2e-4 --full-lrs 1e-4   # quick

Three sides, each the run's own config with one override (``compose_config``, as run.py composes it):

- ``qlora``: ``quant=nf4 finetune=lora`` (the default: NF4 base + LoRA r16 + the new rows);
- ``lora``: ``quant=none finetune=lora``: the same LoRA on the unquantised base (``model.dtype``: float32 on
  the mini base, so on this CPU it is 32-bit LoRA; a GPU run would load bf16);
- ``full``: ``finetune=full`` (quant switches to none): every weight trains.

Each run is its own subprocess (its own peak memory) and trains as run.py does: ``PretrainDataModule`` +
``PretrainModule`` under the configured Lightning ``Trainer`` (``train_throughput.run_bailong``), AdamW,
warm-up + cosine, clipping 1.0, no validation during training. Models:

- ``mini``: the embedded base with the run's extended tokenizer (5,000 + 8,000 pieces) and zip-tie rows
  (``initial_rows``, the pipeline's cache), batch 8 x 256; after training, TC/EN bits/char on the run's
  held-out text (``evaluate_texts``). A learning-rate grid per method (QLoRA's lr reused for 16-bit LoRA),
  the best by TC bits/char. There is no separate dev split yet: the lr is selected on the same held-out
  text that is reported, so the best-of-grid numbers are optimistic for every method alike.
- ``large``: ``train_throughput``'s random Llama (hidden 1024 x 8 layers, 40,000 + 8,000 rows), batch
  4 x 256, random new rows: time and memory only (bits/char of random weights say nothing about transfer).

Memory (Linux, as ``benchmarks/step_memory.py`` measures it): anonymous resident memory, so libraries and the
mmapped weight file are left out and unquantised weights are copied into memory first, where a GPU would
hold them. ``peak_mib`` = the training window's high-water mark (VmHWM reset before ``fit``, minus the
file-backed pages) minus the anonymous memory before the model was built: weights, gradients, optimizer state
and activations at their peak. ``model_mib``: the model alone, before training; ``training_growth_mib`` =
``peak_mib - model_mib``. ``MALLOC_MMAP_THRESHOLD_=65536`` makes freed tensors leave the heap at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, compose_config, machine, run_worker  # noqa: E402
from train_throughput import MODELS as THROUGHPUT_MODELS  # noqa: E402

SIDES = {"qlora": ["quant=nf4", "finetune=lora"], "lora": ["quant=none", "finetune=lora"], "full": ["finetune=full"]}
LABELS = {
    "qlora": "QLoRA (NF4 + LoRA)",
    "lora": "LoRA, unquantised",
    "full": "full fine-tuning",
    "full_fp32": "full fine-tuning, fp32 weights + AdamW",
}
MODELS = {"mini": {"batch_size": 8, "seq_len": 256}, "large": THROUGHPUT_MODELS["large"]}
DEFAULT_STEPS = {"mini": 40, "large": 6}
PLANS = {  # bailong.plan on the paper's 7B recipe
    "qlora": ["experiment=bailong_7b"],
    "lora": ["experiment=bailong_7b", "quant=none"],
    "full": ["experiment=bailong_7b", "finetune=full", "quant=none"],  # the recipe's bf16 weights, paged 8-bit AdamW
    "full_fp32": [
        "experiment=bailong_7b",
        "finetune=full",
        "quant=none",
        "model.dtype=float32",
        "train.optimizer=adamw",
    ],
}


# -- worker: one side, one model, one learning rate, in its own process -------------------------------------
def status_kib(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


def worker(side: str, model_name: str, lr: float, steps: int, warmup: int) -> dict:
    import torch

    from bailong.data.pretrain import PretrainDataModule
    from bailong.data.splits import load_splits
    from bailong.eval.bpc import evaluate_texts
    from bailong.model.build import build_model, count_parameters
    from bailong.stages.common import build_tokenizers, initial_rows
    from common import save_random_llama
    from train_throughput import run_bailong

    spec = MODELS[model_name]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = compose_config(
            [
                *SIDES[side],
                f"data.batch_size={spec['batch_size']}",
                f"data.seq_len={spec['seq_len']}",
                f"train.lr={lr}",
                f"trainer.max_steps={steps}",
            ],
            str(work / "run"),
        )
        splits = load_splits(OmegaConf.to_object(cfg.data))
        _, ext, base_tok, tok = build_tokenizers(cfg, splits)
        if model_name == "mini":  # the run's own zip-tie rows (cached like a run's)
            pretrained, num_base, vocab = cfg.model.pretrained, ext.num_base, len(tok)
            rows, _ = initial_rows(cfg, base_tok, tok, ext.cache_key, splits)
        else:  # the mini tokenizer's ids are a subset of the random Llama's vocabulary
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
            torch.manual_seed(cfg.seed)
            rows = {k: torch.randn(spec["added"], spec["hidden"]) * 0.02 for k in ("embed", "head")}
        data = PretrainDataModule.from_config(tok, OmegaConf.to_object(cfg.data), seed=cfg.seed, splits=splits)
        data.setup("fit")
        gc.collect()
        baseline = status_kib("RssAnon")

        torch.manual_seed(cfg.seed)
        model = build_model(
            dataclasses.replace(OmegaConf.to_object(cfg.model), pretrained=str(pretrained)),
            vocab_size=vocab,
            num_base=num_base,
            rows=rows,
            quant=OmegaConf.to_object(cfg.quant),
            lora=OmegaConf.to_object(cfg.lora),
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            finetune=OmegaConf.to_object(cfg.finetune),
        )
        with torch.no_grad():  # weights still mmapped from the safetensors file -> ordinary memory
            for p in model.parameters():
                if type(p) is torch.nn.Parameter:
                    p.data = p.data.clone()
        params = count_parameters(model)
        gc.collect()
        static = status_kib("RssAnon")
        t1 = time.perf_counter()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the training window's own peak
        file_pages = status_kib("RssFile")
        clock = run_bailong(cfg, data, model, steps, work)
        peak = status_kib("VmHWM") - file_pages
        t2 = time.perf_counter()

        result = {
            "side": side,
            "model": model_name,
            "lr": lr,
            "steps": steps,
            **clock.summary(warmup),
            "peak_mib": round((peak - baseline) / 1024, 1),
            "model_mib": round((static - baseline) / 1024, 1),
            "training_growth_mib": round((peak - static) / 1024, 1),
            "trainable_params": params["trainable"],
            "total_params": params["total"],
            "torch_threads": torch.get_num_threads(),
        }
        if model_name == "mini":
            scores = evaluate_texts(
                model, tok, splits.val(), seq_len=cfg.eval.seq_len or cfg.data.seq_len, batch_size=cfg.eval.batch_size
            )
            result.update({k: scores[k] for k in ("tc_bpc", "en_bpc")})
        result["phase_seconds"] = {
            "setup": round(t1 - t0, 1),
            "train": round(t2 - t1, 1),
            "evaluate": round(time.perf_counter() - t2, 1),
        }
    return result


# -- parent: the grid, the selection, the planner, the table ---------------------------------------------
def planner(overrides: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bailong.plan", *overrides, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    if proc.returncode != 0:
        return {"command": "python -m bailong.plan " + " ".join(overrides), "error": proc.stderr.strip()[-500:]}
    plan = json.loads(proc.stdout)
    setup = plan.get("setup", {})
    return {
        "command": "python -m bailong.plan " + " ".join(overrides),
        "total_gib": round(plan["total_gib"], 2),
        "fits": plan["fits"],
        "step_seconds": round(plan["step_seconds"], 1),
        "gpu": plan["gpu"],
        "assumed_mfu": plan["assumed_mfu"],
        "knows_full_finetuning": "full_finetune" in setup,
        "full_finetune": setup.get("full_finetune"),
        "quantised": setup.get("quantised"),
    }


def trainable(run: dict) -> str:
    return f"{run['trainable_params']:,} ({100 * run['trainable_params'] / run['total_params']:.1f}%)"


def full_over_qlora(runs: dict) -> dict:
    """Full fine-tuning's time per step and peak memory as multiples of QLoRA's (side by side, same load)."""
    full, qlora = runs["full"], runs["qlora"]
    return {
        "seconds_per_step_ratio_full_over_qlora": round(
            full["seconds_per_step_median"] / qlora["seconds_per_step_median"], 2
        ),
        "peak_ratio_full_over_qlora": round(full["peak_mib"] / qlora["peak_mib"], 2),
    }


def markdown(result: dict) -> str:
    steps = result["steps"]
    lines = [
        f"Measured by `{result['command']}` (torch threads {result['machine']['torch_threads']}, load average "
        f"{result['machine']['load_average_1m']} at start and {result['machine']['load_average_1m_end']} at end, "
        f"{result['wall_minutes']} min).",
        "",
    ]
    if "mini" in result["models"]:
        mini = result["models"]["mini"]
        every = result.get("seconds_per_step_all_runs", {}).get("mini", {})
        lines += [
            f"**Mini base** (h256 x 4 layers, 5,000 + 8,000 pieces, zip-tie rows; LoRA r16 + the new rows), "
            f"batch 8 x 256, "
            f"{steps['mini']} steps, best learning rate of each method's grid by TC bits/char on the held-out "
            "text (no separate dev split yet: selected on the reported text). s/step: median of the timed "
            "steps, then the median over the method's grid runs (the CPU was shared):",
            "",
            "| method | best lr | s/step | peak MiB | model MiB | trainable params | TC bpc | EN bpc |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for side in SIDES:
            if side in mini["best"]:
                r = mini["best"][side]
                seconds = every.get(side, r["seconds_per_step_median"])
                lines.append(
                    f"| {LABELS[side]} | {r['lr']:g} | {seconds:.2f} | {r['peak_mib']:.0f} | "
                    f"{r['model_mib']:.0f} | {trainable(r)} | {r['tc_bpc']:.3f} | {r['en_bpc']:.3f} |"
                )
        lines += [
            "",
            "Learning-rate grid (TC / EN bits/char after the same steps):",
            "",
            "| method | " + " | ".join("lr" for _ in range(max(len(v) for v in mini["grid"].values()))) + " |",
            "|---|" + "---|" * max(len(v) for v in mini["grid"].values()),
        ]
        for side, runs in mini["grid"].items():
            lines.append(
                f"| {LABELS[side]} | "
                + " | ".join(f"{r['lr']:g}: {r['tc_bpc']:.3f} / {r['en_bpc']:.3f}" for r in runs)
                + " |"
            )
        lines.append("")
    if "large" in result["models"]:
        large = result["models"]["large"]
        spec = MODELS["large"]
        lines += [
            f"**Random Llama** (h{spec['hidden']} x {spec['layers']} layers, {spec['base_vocab']:,} + "
            f"{spec['added']:,} rows), batch {spec['batch_size']} x {spec['seq_len']}, {steps['large']} steps "
            "(the first 2 untimed): time and memory only.",
            "",
            "| method | s/step (median) | peak MiB | model MiB | trainable params |",
            "|---|---|---|---|---|",
        ]
        for side in SIDES:
            if side in large["runs"]:
                r = large["runs"][side]
                lines.append(
                    f"| {LABELS[side]} | {r['seconds_per_step_median']:.2f} | {r['peak_mib']:.0f} | "
                    f"{r['model_mib']:.0f} | {trainable(r)} |"
                )
        lines.append("")
    if result.get("plan_7b"):
        lines += [
            "**Llama-2-7B, planned** (`bailong.plan`, per GPU, `experiment=bailong_7b`: r64, seq 2,048, "
            "micro-batch 1, checkpointing, paged 8-bit AdamW, bf16):",
            "",
            "| method | command | GiB | fits 24/40/80 GB | s/step (assumed MFU) |",
            "|---|---|---|---|---|",
        ]
        for side, plan in result["plan_7b"].items():
            if "error" in plan:
                lines.append(f"| {LABELS[side]} | `{plan['command']}` | failed: {plan['error'][-120:]} | | |")
                continue
            fits = "/".join("yes" if plan["fits"][f"{g}GB"] else "no" for g in (24, 40, 80))
            note = (
                ""
                if not side.startswith("full") or plan["knows_full_finetuning"]
                else " (planner without full fine-tuning yet: this is unquantised LoRA)"
            )
            lines.append(
                f"| {LABELS[side]} | `{plan['command']}` | {plan['total_gib']:.2f}{note} | {fits} | "
                f"{plan['step_seconds']} s on {plan['gpu']} at {plan['assumed_mfu']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: mini 40, large 6)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument(
        "--qlora-lrs",
        type=float,
        nargs="+",
        default=[2e-4, 5e-4, 1e-3, 2e-3],
        help="LoRA grid on the mini base (QLoRA; the best is reused for unquantised LoRA)",
    )
    parser.add_argument(
        "--full-lrs",
        type=float,
        nargs="+",
        default=[1e-4, 3e-4, 1e-3, 3e-3],
        help="full fine-tuning grid on the mini base",
    )
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    parser.add_argument("--render", default=None, metavar="JSON", help="print the markdown of a saved result")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=2e-4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return
    if args.worker:
        side, model_name = args.worker
        print(json.dumps(worker(side, model_name, args.lr, args.steps, args.warmup)))
        return

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # for the workers: freed tensors leave at once
    started = time.perf_counter()
    script = Path(__file__).resolve()
    steps = {m: args.steps or DEFAULT_STEPS[m] for m in args.models}
    result = {
        "benchmark": "finetune_compare",
        "command": "python benchmarks/finetune_compare.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
        "steps": steps,
        "models": {},
    }

    def run(side: str, model_name: str, lr: float) -> dict:
        out = run_worker(
            script,
            [
                "--worker",
                side,
                model_name,
                "--lr",
                str(lr),
                "--steps",
                str(steps[model_name]),
                "--warmup",
                str(args.warmup),
            ],
            timeout=1800,
        )
        print(
            json.dumps(
                {
                    k: out.get(k)
                    for k in (
                        "side",
                        "model",
                        "lr",
                        "seconds_per_step_median",
                        "peak_mib",
                        "tc_bpc",
                        "en_bpc",
                        "process_seconds",
                    )
                }
            ),
            file=sys.stderr,
        )
        return out

    if "mini" in args.models:
        grid: dict[str, list] = {"qlora": [], "full": []}
        for k in range(max(len(args.qlora_lrs), len(args.full_lrs))):  # alternating: load from other jobs hits both
            for side, lrs in (("qlora", args.qlora_lrs), ("full", args.full_lrs)):
                if k < len(lrs):
                    grid[side].append(run(side, "mini", lrs[k]))
        best = {side: min(runs, key=lambda r: r["tc_bpc"]) for side, runs in grid.items()}
        best["lora"] = run("lora", "mini", best["qlora"]["lr"])
        result["models"]["mini"] = {
            "spec": MODELS["mini"],
            "grid": grid,
            "best": best,
            "selection": "final tc_bpc",
            **full_over_qlora(best),
        }
    if "large" in args.models:
        runs = {side: run(side, "large", 2e-4) for side in SIDES}
        result["models"]["large"] = {"spec": MODELS["large"], "runs": runs, **full_over_qlora(runs)}
    result["plan_7b"] = {side: planner(overrides) for side, overrides in PLANS.items()}
    result["machine"]["load_average_1m_end"] = machine()["load_average_1m"]
    result["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    result["seconds_per_step_all_runs"] = {
        m: {side: statistics.median(r["seconds_per_step_median"] for r in runs) for side, runs in entry["grid"].items()}
        for m, entry in result["models"].items()
        if "grid" in entry
    }
    print(json.dumps(result, indent=2))
    table = markdown(result)
    print(table, file=sys.stderr)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
