"""One command for a GPU: the checks a CPU cannot run, in one JSON, in under 8 minutes.

    make gpu-check                                    # python benchmarks/gpu_check.py (docs/gpu.md)
    python benchmarks/gpu_check.py --budget 450 --out my.json --parts smoke qlora_7b
    python benchmarks/gpu_check.py --cpu-smoke        # the same code paths at tiny shapes on the CPU (a test)

Parts, in this order, each timed and guarded: a failing part records its error (type, message) and the next
one runs; when the time budget (default 7.5 min) runs short, the parts left are skipped with the reason.

- ``smoke``: ``experiment=smoke trainer=gpu logger=csv`` through ``bailong.stages.run`` (NF4, bf16-mixed),
  beside the same config with ``trainer.accelerator=cpu`` in a subprocess that cannot see the GPU (it runs
  while the other parts use the GPU); each side has its own cache, so tokenizer, init rows and every metric
  are computed twice. Metrics compared with relative tolerances (``tolerance``).
- ``qlora_7b``: the Llama-2-7B-shaped random base (``model=llama2_7b_widths``, 32 layers, built on the GPU),
  ``experiment=bailong_7b``'s recipe: NF4 + LoRA r64 on every projection + the 27,241 new rows trainable,
  59,264 rows (``model.pad_vocab_to_multiple_of=64``), seq 2,048, checkpointing, paged 8-bit AdamW, on the
  project's packed TC/EN rows. Micro-batch 1, then upward (doubling, then bisecting) to the largest that fits
  24 GiB (torch's allocator capped at 24 GiB less the CUDA context), one loaded model for every trial:
  tokens/s, peak ``torch.cuda.max_memory_allocated`` next to ``bailong.plan``'s prediction, MFU.
- ``hf_trainer``: the same model and rows through transformers ``Trainer`` + peft
  (``train_throughput.run_hf``, packed), micro-batch 1: the bailong/Trainer speed ratio.
- ``attention``: ``model.attn_implementation`` eager (and flash_attention_2 when importable) against sdpa.
- ``vocab_padding``: ``model.pad_vocab_to_multiple_of=1`` (59,241 rows) against 64 (59,264).

Output: ``benchmarks/results/gpu_check-<gpu>-<date>.json`` (``--cpu-smoke``: under ``outputs/gpu_check/``; its
numbers are a test's, not results). docs/gpu.md explains every field. Exit status 1 if a part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

STARTED = time.monotonic()
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # no install needed
from common import ROOT, compose_config  # noqa: E402  (sets the hub and W&B offline)
from gpu_check_model import (  # noqa: E402
    GIB,
    error_record,
    free_memory,
    merged,
    part_attention,
    part_hf,
    part_padding,
    part_qlora,
    release_model,
)

PARTS = ("smoke", "qlora_7b", "hf_trainer", "attention", "vocab_padding")
GRACE_S = 20  # the watchdog ends the process this long after the budget (budget 450 s: 470 s < 8 min)

# the paper's recipe on the random 7B-width base; micro-batches of 1 per optimizer step (the recipe accumulates
# 16, which changes nothing per micro-batch but the optimizer's share), no checkpoint or logger callbacks
RECIPE_7B = [
    "experiment=bailong_7b",
    "model=llama2_7b_widths",
    "model.random_base.num_layers=32",
    "data=pretrain_tc",
    "data.seq_len=2048",
    "data.batch_size=1",
    "trainer.accumulate_grad_batches=1",
    "logger=csv",
    "callbacks=none",
]


@dataclass
class Profile:
    """What differs between the GPU check and its CPU smoke: shapes, devices, step counts and time."""

    name: str
    device: str  # cuda | cpu
    smoke: list[str]  # part smoke's overrides (the reference side adds trainer.accelerator=cpu)
    smoke_own_caches: bool  # each side of part smoke computes its own tokenizer, rows and base metrics
    model: list[str]  # parts qlora_7b .. vocab_padding
    warmup: int
    timed: int
    max_micro_batch: int
    memory_gib: float | None  # the card the micro-batch search emulates
    budget_s: float
    search_s: float
    needs_s: dict[str, float]  # a part starts only with this much of the budget left
    tiny_base: dict | None = None  # CPU smoke: a small random Llama instead of the 7B-width one
    switched: list[str] = field(default_factory=list)  # what the CPU smoke changes, said in the JSON


GPU = Profile(
    "gpu",
    "cuda",
    smoke=["experiment=smoke", "trainer=gpu", "logger=csv"],
    smoke_own_caches=True,
    model=RECIPE_7B,
    warmup=3,
    timed=5,
    max_micro_batch=64,
    memory_gib=24.0,
    budget_s=450.0,
    search_s=150.0,
    needs_s={"smoke": 60, "qlora_7b": 150, "hf_trainer": 40, "attention": 70, "vocab_padding": 70},
)
CPU_SMOKE = Profile(
    "cpu-smoke",
    "cpu",
    smoke=merged(
        GPU.smoke, ["trainer=cpu", "init=mean", "trainer.max_steps=1", "data.seq_len=64", "data.max_val_chars=200"]
    ),
    smoke_own_caches=False,
    model=merged(
        RECIPE_7B, ["model.random_base=null", "trainer.accelerator=cpu", "train.optimizer=adamw", "data.seq_len=128"]
    ),
    warmup=1,
    timed=2,
    max_micro_batch=2,
    memory_gib=None,
    budget_s=900.0,
    search_s=300.0,
    needs_s={part: 5 for part in PARTS},
    tiny_base=dict(hidden=256, layers=2, heads=4, intermediate=768, vocab=32000),
    switched=[
        "devices: cpu instead of cuda; bf16-mixed autocast on the CPU, except part smoke (trainer=cpu: "
        "32-true, which evaluates several times faster on a CPU)",
        "base: random Llama hidden 256 x 2 layers, Llama-2 tokenizer (32,000 + 27,241 pieces), not 7B widths",
        "seq 128, micro-batches 1 and 2 (no CUDA memory to fill), 1 warm-up + 2 timed steps",
        "train.optimizer=adamw (paged 8-bit AdamW needs CUDA)",
        "smoke: init=mean, 1 step, seq 64, 200 held-out characters per language; both sides on the CPU "
        "and sharing the repository's cache (tokenizer, rows and base metrics computed once)",
        "flash_attention_2 skipped (needs CUDA and flash-attn)",
    ],
)

# dense bf16 tensor TFLOP/s by device name (first match wins); a str is a key of bailong.plan.GPUS
PEAK_BF16 = (
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", "h100-80gb"),
    (r"A100", "a100-80gb"),
    (r"L40S", 362.0),
    (r"RTX 4090", "rtx4090"),
    (r"\bA10\b", "a10"),
    (r"\bL4\b", "l4"),
)


def peak_bf16(name: str) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s, where the number comes from) for a CUDA device name."""
    from bailong.plan import GPUS

    for pattern, value in PEAK_BF16:
        if re.search(pattern, name):
            if isinstance(value, str):
                return GPUS[value][1], f"bailong.plan.GPUS[{value!r}] (vendor datasheet, dense bf16)"
            return value, f"vendor datasheet, dense bf16 (table PEAK_BF16, matched {pattern!r})"
    return None, f"{name!r} is not in PEAK_BF16: pass --peak-tflops for an MFU"


# -- the report: one JSON, rewritten after every step, so a killed run still leaves what it measured ----------
class Report:
    def __init__(self, path: Path, profile: Profile, budget_s: float, selected: list[str]):
        self.path, self.budget_s, self.selected = path, budget_s, selected
        self.lock = threading.RLock()
        self.children: list[subprocess.Popen] = []
        self.data = {
            "check": "gpu_check",
            "mode": profile.name,
            "started": datetime.now().isoformat(timespec="seconds"),
            "budget_seconds": budget_s,
            "parts": {p: {"status": "pending"} for p in PARTS},
        }
        if profile.switched:
            self.data["cpu_smoke"] = {
                "note": "a test of the code paths at tiny shapes; its numbers are not results",
                "switched": profile.switched,
            }

    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def write(self) -> None:
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False, default=str) + "\n")
            tmp.replace(self.path)

    def run_part(self, name: str, fn, needs_s: float, blocked: str | None = None):
        """``fn(entry)`` fills ``entry`` as it goes; its error is recorded and the check goes on."""
        entry = self.data["parts"][name]
        if name not in self.selected:
            entry.update(status="skipped", reason="not selected (--parts)")
            return None
        if blocked:
            entry.update(status="skipped", reason=blocked)
            return None
        if self.remaining() < needs_s:
            entry.update(
                status="skipped",
                reason=f"time budget: {max(0.0, self.remaining()):.0f} s left of "
                f"{self.budget_s:.0f}, this part needs about {needs_s:.0f} s",
            )
            self.write()
            return None
        entry.update(status="running", started_at_s=round(self.elapsed(), 1))
        self.write()
        started = time.perf_counter()
        try:
            result = fn(entry)
            entry["status"] = "running" if entry.get("waiting_for") else "ok"  # smoke: until its CPU side is in
            return result
        except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
            entry.update(status="error", error=error_record(e))
            print(f"gpu_check: part {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 1)
            self.write()
            free_memory()

    def abort(self, why: str) -> None:
        """The watchdog: mark what is running as failed, the rest as skipped, write, stop the children."""
        with self.lock:
            for entry in self.data["parts"].values():
                if entry["status"] == "running":
                    entry.update(status="error", error={"type": "TimeBudgetExceeded", "message": why})
                elif entry["status"] == "pending":
                    entry.update(status="skipped", reason=why)
            for child in self.children:
                child.kill()
            self.finish()

    def finish(self) -> dict:
        with self.lock:
            parts = self.data["parts"]
            self.data["finished"] = datetime.now().isoformat(timespec="seconds")
            self.data["wall_seconds"] = round(self.elapsed(), 1)
            self.data["summary"] = summary(parts)
            self.write()
            return self.data


def summary(parts: dict) -> dict:
    """The headline numbers, each from its part (None where the part did not produce it)."""

    def get(part, *keys):
        node = parts.get(part, {})
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    return {
        "status": {name: p["status"] for name, p in parts.items()},
        "smoke_within_tolerance": get("smoke", "comparison", "within_tolerance"),
        "tokens_per_sec_micro_batch_1": get("qlora_7b", "micro_batch_1", "tokens_per_sec"),
        "largest_micro_batch": get("qlora_7b", "largest", "micro_batch"),
        "tokens_per_sec_largest": get("qlora_7b", "largest", "tokens_per_sec"),
        "mfu_largest": get("qlora_7b", "largest", "mfu"),
        "peak_allocated_gib_micro_batch_1": get("qlora_7b", "micro_batch_1", "peak_allocated_gib"),
        "planned_gib_micro_batch_1": get("qlora_7b", "micro_batch_1", "planned", "torch_allocated_gib"),
        "bailong_over_hf_trainer": get("hf_trainer", "ratio_bailong_over_hf"),
        "eager_over_sdpa": get("attention", "variants", "eager", "ratio_over_reference"),
        "flash_attention_2_over_sdpa": get("attention", "variants", "flash_attention_2", "ratio_over_reference"),
        "unpadded_over_padded": get("vocab_padding", "variants", "unpadded", "ratio_over_reference"),
    }


# -- part smoke: the real pipeline on the device, and the same config on the CPU -----------------------------
def run_smoke(overrides: list[str], work: Path, own_cache: bool) -> dict:
    """``experiment=smoke`` through ``bailong.stages.run`` in ``work``, with its own cache there or not."""
    from bailong.stages import run

    cfg = compose_config(
        merged(overrides, [f"paths.cache_dir={work / 'cache'}"] if own_cache else []), output_dir=work / "run"
    )
    started = time.perf_counter()
    metrics = run(cfg)
    return {"seconds": round(time.perf_counter() - started, 1), "metrics": metrics}


def start_reference(ctx) -> None:
    """The CPU side of part smoke, in a process that cannot see the GPU; it runs beside the GPU parts with half
    the CPU cores (a GPU check only needs one core to feed the device)."""
    work = ctx.tmp / "smoke_cpu"
    work.mkdir()
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    overrides = merged(ctx.profile.smoke, ["trainer.accelerator=cpu"])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log = open(work / "log.txt", "w")  # noqa: SIM115 - closed in finish_smoke
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--smoke-worker",
            json.dumps(overrides),
            str(work),
            str(int(ctx.profile.smoke_own_caches)),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ctx.report.children.append(proc)
    ctx.reference = SimpleNamespace(
        proc=proc,
        work=work,
        log=log,
        overrides=overrides,
        threads=int(threads),
        started_at_s=round(ctx.report.elapsed(), 1),
    )


def part_smoke(ctx, entry: dict) -> None:
    entry["overrides"] = ctx.profile.smoke
    entry["own_caches"] = ctx.profile.smoke_own_caches
    entry["device_side"] = run_smoke(ctx.profile.smoke, ctx.tmp / "smoke_device", ctx.profile.smoke_own_caches)
    entry["waiting_for"] = "the CPU reference (collected at the end of the check)"


def finish_smoke(ctx) -> None:
    """Collect the CPU reference (waiting at most until the budget ends) and compare."""
    entry, ref = ctx.report.data["parts"]["smoke"], getattr(ctx, "reference", None)
    if ref is None:
        return
    try:
        ref.proc.wait(timeout=max(1.0, ctx.report.remaining()))
    except subprocess.TimeoutExpired:
        ref.proc.kill()
        ref.proc.wait()
    ref.log.close()
    side = {
        "overrides": ref.overrides,
        "threads": ref.threads,
        "started_at_s": ref.started_at_s,
        "finished_at_s": round(ctx.report.elapsed(), 1),
        "returncode": ref.proc.returncode,
    }
    result = ref.work / "result.json"
    if ref.proc.returncode == 0 and result.is_file():
        side.update(json.loads(result.read_text()))
    else:
        why = "killed at the end of the time budget" if ref.proc.returncode in (-9, 137) else "failed"
        side["log_tail"] = (ref.work / "log.txt").read_text(errors="replace")[-3000:]
        if entry.get("status") == "running":
            entry.update(
                status="error",
                error={
                    "type": "CpuReferenceFailed",
                    "message": f"the CPU reference {why} "
                    f"(exit {ref.proc.returncode}); its log's end is in cpu_reference",
                },
            )
    entry["cpu_reference"] = side
    entry.pop("waiting_for", None)
    if "metrics" in side and "device_side" in entry:
        entry["comparison"] = compare_metrics(entry["device_side"]["metrics"], side["metrics"])
        dev, cpu = entry["device_side"]["metrics"], side["metrics"]
        if dev.get("train/tokens_per_sec") and cpu.get("train/tokens_per_sec"):
            entry["train_speed_device_over_cpu"] = round(dev["train/tokens_per_sec"] / cpu["train/tokens_per_sec"], 2)
    if entry.get("status") == "running":
        entry["status"] = "ok"
    ctx.report.write()


def tolerance(key: str) -> float | None:
    """Relative tolerance of one metrics.json key between the CUDA and the CPU run; None: not compared (speed).

    Both sides run the same bf16 recipe, but bitsandbytes' CUDA kernels and its CPU path (dequantise, then a
    oneDNN matmul) round bf16 products and sums in different orders: each bf16 result may differ by an ulp
    (2^-8 relative). Bits/char sum thousands of such terms, so before training they agree to about 1e-3;
    1% leaves room. Training (4 steps of AdamW, warm-up 1) feeds those differences into the weights, and the
    zip-tie rows are fitted on each device: 2% after training. Counts (characters, tokens, parameters,
    tokenizer statistics) do not depend on arithmetic and must be equal. The new rows' movement statistics
    (``tokens/*_change_*``) are not compared: AdamW's first steps divide by sqrt(v) + eps, so a row whose gradient
    is near zero moves by an amount rounding decides (two CPU processes already gave values 1e-6 apart, and the
    CUDA kernels round otherwise); the token counts (``tokens/new_*``, ``tokens/consumed``) are equal."""
    stage, _, stat = key.partition("/")
    if stage == "train" and stat != "steps":
        return None
    if stage == "tokens" and "_change_" in stat:
        return None
    if stage in ("base", "step0", "final") and stat.endswith(("_bpc", "_bpb", "_bits", "information_parity")):
        rtol = 0.02 if stage == "final" else 0.01
        # the parallel set's information parity is a ratio of two such sums (EN bits / TC bits): twice the room
        return 2 * rtol if stat.endswith("information_parity") else rtol
    return 0.0


def compare_metrics(device: dict, cpu: dict) -> dict:
    rows, outside = {}, []
    for key in sorted(set(device) & set(cpu)):
        rtol, a, b = tolerance(key), device[key], cpu[key]
        if rtol is None:
            continue
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            diff = abs(a - b) / max(abs(b), 1e-12)
            ok = diff <= rtol
            rows[key] = {"device": a, "cpu": b, "rel_diff": diff, "rtol": rtol, "within": ok}
        else:
            ok = a == b
            rows[key] = {"device": a, "cpu": b, "within": ok}
        if not ok:
            outside.append(key)
    return {
        "within_tolerance": not outside and bool(rows),
        "outside": outside,
        "metrics": rows,
        "only_device": sorted(set(device) - set(cpu)),
        "only_cpu": sorted(set(cpu) - set(device)),
        "tolerances": "bits/char, bits/byte, bits: 1% before training, 2% after (information parity, their "
        "ratio: twice that); counts equal; "
        "speed and the new rows' movement statistics not compared",
    }


# -- the environment and main ---------------------------------------------------------------------------------
def environment(ctx) -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "hydra-core", "omegaconf", "flash-attn"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["cuda"] = torch.version.cuda
    try:
        from bitsandbytes.cextension import lib

        versions["bitsandbytes_library"] = Path(lib._lib._name).name
    except Exception:  # noqa: BLE001 - informative only
        versions["bitsandbytes_library"] = None
    device = {"name": "cpu", "cpus": os.cpu_count()}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        device = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": p.total_memory / GIB,
            "multiprocessors": p.multi_processor_count,
            "cpus": os.cpu_count(),
        }
        peak, source = peak_bf16(p.name)
        if ctx.args.peak_tflops:
            peak, source = ctx.args.peak_tflops, "--peak-tflops"
        device.update(peak_bf16_tflops=peak, peak_source=source)
        ctx.peak_tflops = peak
    return {"device": device, "versions": versions}


def default_out(profile: Profile) -> Path:
    day = datetime.now().strftime("%Y-%m-%d")
    if profile.device == "cpu":
        return ROOT / "outputs" / "gpu_check" / f"gpu_check-cpu-smoke-{day}.json"
    import torch

    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    path = ROOT / "benchmarks" / "results" / f"gpu_check-{name}-{day}.json"
    n = 2
    while path.exists():
        path = path.with_name(f"gpu_check-{name}-{day}-{n}.json")
        n += 1
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: a test of the code paths")
    p.add_argument("--out", type=Path, help="the JSON (default: benchmarks/results/gpu_check-<gpu>-<date>.json)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (GPU default 450)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--memory-gib", type=float, help="the card the micro-batch search emulates (default 24)")
    p.add_argument("--max-micro-batch", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int, help="timed steps per measurement (GPU default 5)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where PEAK_BF16 lacks it")
    p.add_argument("--smoke-worker", nargs=3, metavar=("OVERRIDES_JSON", "WORK", "OWN_CACHE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke_worker:  # the CPU side of part smoke (start_reference)
        overrides, work, own = json.loads(args.smoke_worker[0]), Path(args.smoke_worker[1]), args.smoke_worker[2]
        (work / "result.json").write_text(json.dumps(run_smoke(overrides, work, own == "1"), default=str))
        return 0
    profile = CPU_SMOKE if args.cpu_smoke else GPU
    profile = replace(
        profile,
        **{
            k: v
            for k, v in dict(
                budget_s=args.budget,
                memory_gib=args.memory_gib,
                max_micro_batch=args.max_micro_batch,
                warmup=args.warmup,
                timed=args.steps,
            ).items()
            if v is not None
        },
    )
    import torch

    if profile.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA device; `--cpu-smoke` runs the same code paths on the CPU", file=sys.stderr
        )
        return 2
    out = (args.out or default_out(profile)).resolve()
    report = Report(out, profile, profile.budget_s, args.parts)
    watchdog = threading.Timer(
        max(1.0, profile.budget_s + GRACE_S - report.elapsed()),
        lambda: (report.abort(f"the check ran past its budget of {profile.budget_s:.0f} s + {GRACE_S} s"), os._exit(3)),
    )
    watchdog.daemon = True
    watchdog.start()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = SimpleNamespace(
            args=args,
            profile=profile,
            report=report,
            tmp=Path(tmp),
            cuda=profile.device == "cuda",
            prepared=None,
            model=None,
            peak_tflops=None,
        )
        report.data.update(environment(ctx))
        report.data["output"] = str(out)
        report.write()
        print(f"gpu_check: writing {out}", flush=True)
        needs = profile.needs_s
        if "smoke" in args.parts and report.remaining() >= needs["smoke"]:
            start_reference(ctx)
        report.run_part("smoke", lambda e: part_smoke(ctx, e), needs["smoke"])
        report.run_part("qlora_7b", lambda e: part_qlora(ctx, e), needs["qlora_7b"])
        no_model = None if ctx.model is not None else "needs the model part qlora_7b loads, which it did not load"
        report.run_part("hf_trainer", lambda e: part_hf(ctx, e), needs["hf_trainer"], blocked=no_model)
        release_model(ctx)
        report.run_part("attention", lambda e: part_attention(ctx, e), needs["attention"])
        report.run_part("vocab_padding", lambda e: part_padding(ctx, e), needs["vocab_padding"])
        finish_smoke(ctx)
        watchdog.cancel()
        data = report.finish()
    print(json.dumps(data["summary"], indent=2))
    print(f"gpu_check: wrote {out}")
    return 1 if any(p["status"] == "error" for p in data["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
