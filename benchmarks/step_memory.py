"""Measured vs planned memory of training steps on the CPU (the check behind bailong.plan).

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/step_memory.py models/mini-base --added 8000 \
        --seq 256 --batch 8 --quant nf4
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/step_memory.py --config experiment=llama2_7b_widths

The first form builds a model from a directory and flags; ``--config`` composes the run's config like
``run.py`` (any overrides), builds the random base if ``model.random_base`` asks for one, and builds the model
through the pipeline's own ``make_model`` with the config's quantisation, LoRA, dtype, checkpointing,
vocabulary padding and fine-tuning mode (random values for the new rows: their values do not change memory).

Either way it runs three optimizer steps as training runs them (``causal_lm_loss``: the chunked fused
cross-entropy of ``PretrainModule.training_step``, under the trainer's autocast; backward; gradient clipping;
the configured optimizer; ``zero_grad(set_to_none=True)``) and prints JSON:

* ``measured_gib``: peak anonymous resident memory during steps 2-3 minus the anonymous resident memory
  before the model was built (so Python, torch and the libraries are excluded). The peak is the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the file-backed pages
  (``RssFile``: libraries and the safetensors file, which a GPU never holds). Unquantised weights that
  ``from_pretrained`` left mmapped to the file are first copied into memory, where a GPU would hold them.
  ``measured_phases_gib`` splits it by phase (forward + loss, backward, clipping + optimizer step): the
  high-water mark is reset before each one.
* ``planned_gib``: ``bailong.plan``'s ``cpu_comparable_gib`` for the same setup: every term but the CUDA
  context and allocator slack; ``planned_phases_gib`` the planner's own phase totals.

``MALLOC_MMAP_THRESHOLD_`` fixes glibc's mmap threshold so freed tensors go back to the OS at once, as
they go back to PyTorch's caching allocator on a GPU; without it freed memory lingers in malloc's heap
and resident memory overstates what is live.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bailong.model.build import build_model, follow_autocast  # noqa: E402
from bailong.model.config import LoraConfig, ModelConfig, QuantConfig
from bailong.plan import (  # noqa: E402
    PROJECTIONS,  # noqa: E402
    Setup,
    architecture,
    estimate,
    setup_from_config,
)
from bailong.train.loss import causal_lm_loss  # noqa: E402
from bailong.train.pretrain import _param_groups, make_optimizer  # noqa: E402

GIB = 1024**3


def status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); the file-backed pages at that moment, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("RssFile")


def peak_kib(file_pages: int) -> int:
    return status_kib("VmHWM") - file_pages


def warm_up(quant: str) -> None:
    """One training step of a tiny Llama through the same code paths, before the baseline is read: the modules
    transformers, peft and bitsandbytes import lazily and the buffers torch's kernels keep after a first call are
    process overhead (tens of MB), not memory of the model being measured."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=300,
            max_position_embeddings=64,
        )
        LlamaForCausalLM(config).save_pretrained(tmp)
        model = build_model(
            ModelConfig(name="bench", pad_vocab_to_multiple_of=1, pretrained=tmp),
            vocab_size=310,
            num_base=300,
            rows={"embed": torch.zeros(10, 64), "head": torch.zeros(10, 64)},
            quant=QuantConfig(name=quant),
            lora=LoraConfig(r=4, alpha=8, dropout=0.1, embeddings="new_rows"),
            gradient_checkpointing=True,
        )
        opt = make_optimizer("adamw", _param_groups(model, 1e-4, None, 0.0), (0.9, 0.95))
        for precision in (nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
            with precision:
                loss = causal_lm_loss(model, torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        del model, opt, loss


def from_flags(args) -> tuple[Setup, Callable, dict]:
    """The Setup and a model builder for ``pretrained`` + command-line flags (fp32, AdamW)."""

    class ModelCfg:  # what bailong.plan.architecture reads
        pretrained, revision, random_base = args.pretrained, None, None

    arch = architecture(ModelCfg)
    setup = Setup(
        arch=arch,
        added_vocab=args.added,
        seq_len=args.seq,
        micro_batch=args.batch,
        quantised=args.quant == "nf4",
        double_quant=True,
        dtype_bytes=4,
        autocast=False,
        lora_r=args.r,
        lora_dropout=args.dropout,
        shared_dropout_mask=args.shared_dropout_mask,
        targets=PROJECTIONS,
        embeddings=args.embeddings,
        optimizer="adamw",
        checkpointing=args.checkpointing,
        strategy="single",
        world_size=1,
        device="cpu",
    )

    def build(rows):
        quant = QuantConfig(name=args.quant)
        lora = LoraConfig(
            r=args.r,
            alpha=2 * args.r,
            dropout=args.dropout,
            shared_dropout_mask=args.shared_dropout_mask,
            embeddings=args.embeddings,
        )
        return build_model(
            ModelConfig(name="bench", pad_vocab_to_multiple_of=1, pretrained=args.pretrained),
            vocab_size=setup.vocab,
            num_base=arch.base_vocab,
            rows=rows,
            quant=quant,
            lora=lora,
            gradient_checkpointing=args.checkpointing,
        )

    train = {
        "optimizer": "adamw",
        "lr": 1e-4,
        "embedding_lr": None,
        "weight_decay": 0.0,
        "betas": (0.9, 0.95),
        "clip": None,
        "precision": "32-true",
    }
    return setup, build, train


def from_config(overrides: list[str]) -> tuple[Setup, Callable, dict]:
    """The Setup and the pipeline's own model builder for a composed run config."""
    from bailong.config import compose_config
    from bailong.model.random_base import ensure_random_base
    from bailong.stages.common import make_model

    cfg = compose_config(overrides, output_dir="/tmp/step_memory")
    ensure_random_base(cfg.model)
    setup = setup_from_config(cfg, device="cpu")  # torch's CPU code paths (AdamW per tensor, dropout masks)

    def build(rows):  # make_model reads only len(tok) of the tokenizer: range(vocab) has that length
        return make_model(cfg, range(setup.vocab), setup.arch.base_vocab, rows, torch.device("cpu"))

    t = cfg.train
    train = {
        "optimizer": t.optimizer,
        "lr": t.lr,
        "embedding_lr": t.embedding_lr,
        "weight_decay": t.weight_decay,
        "betas": tuple(t.betas),
        "clip": cfg.trainer.gradient_clip_val,
        "precision": str(cfg.trainer.precision),
    }
    return setup, build, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pretrained", nargs="?")
    p.add_argument("--config", nargs="+", metavar="OVERRIDE", help="compose the run config (run.py overrides)")
    p.add_argument("--added", type=int, default=0)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--shared-dropout-mask", action="store_true", help="lora.shared_dropout_mask")
    p.add_argument("--embeddings", default="new_rows")
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args()
    if bool(args.pretrained) == bool(args.config):
        p.error("give a model directory or --config OVERRIDE..., not both")
    torch.manual_seed(0)
    setup, build, train = from_config(args.config) if args.config else from_flags(args)
    plan = estimate(setup)

    warm_up("nf4" if setup.quantised else "none")
    gc.collect()
    baseline = status_kib("RssAnon")
    hidden, added = setup.arch.hidden, setup.added_vocab
    rows = {"embed": torch.randn(added, hidden) * 0.02, "head": torch.randn(added, hidden) * 0.02} if added else None
    model = build(rows)
    follow_autocast(model, train["precision"])  # as PretrainModule.on_fit_start does
    del rows
    with torch.no_grad():  # weights still mmapped from the safetensors file -> ordinary memory
        for param in model.parameters():
            if type(param) is torch.nn.Parameter:
                param.data = param.data.clone()
    opt = make_optimizer(
        train["optimizer"],
        _param_groups(model, train["lr"], train["embedding_lr"], train["weight_decay"]),
        train["betas"],
    )
    batch = torch.randint(0, setup.vocab, (setup.micro_batch, setup.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if train["precision"].startswith("bf16") else nullcontext()
    phases = {"forward": 0, "backward": 0, "optimizer": 0}
    held = {}  # what is resident between backward and the optimizer step

    def step(measure: bool) -> None:
        file_pages = reset_peak()
        with autocast:  # Lightning's precision plugin wraps the training step in autocast, not backward
            loss = causal_lm_loss(model, batch, batch)
        if measure:
            phases["forward"] = max(phases["forward"], peak_kib(file_pages))
            file_pages = reset_peak()
        loss.backward()
        del loss
        if measure:
            phases["backward"] = max(phases["backward"], peak_kib(file_pages))
            grads = {
                q.grad.untyped_storage().data_ptr(): q.grad.untyped_storage().nbytes()
                for q in model.parameters()
                if q.grad is not None
            }
            held.update(after_backward=status_kib("RssAnon"), gradients=sum(grads.values()) / 1024)
            file_pages = reset_peak()
        if train["clip"]:
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], train["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if measure:
            phases["optimizer"] = max(phases["optimizer"], peak_kib(file_pages))

    step(measure=False)  # the first step allocates the optimizer state
    gc.collect()
    static = status_kib("RssAnon")
    for _ in range(2):
        step(measure=True)
    measured = (max(phases.values()) - baseline) / 1024**2
    planned = plan.cpu_comparable_gib
    print(
        json.dumps(
            {
                "measured_gib": measured,
                "planned_gib": planned,
                "error": (planned - measured) / measured,
                "measured_phases_gib": {k: (v - baseline) / 1024**2 for k, v in phases.items()},
                "planned_phases_gib": plan.phases_gib,
                "measured_static_gib": (static - baseline) / 1024**2,
                "planned_static_gib": plan.static_gib,
                "measured_after_backward_gib": (held["after_backward"] - baseline) / 1024**2,
                "measured_gradients_gib": held["gradients"] / 1024**2,
                "planned_components_gib": plan.components_gib,
                "threads": torch.get_num_threads(),
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                "args": vars(args),
                "setup": {**plan.setup, "arch": plan.setup["arch"]},
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
