"""Measured vs planned memory of training steps on the CPU (the check behind bailong.plan).

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/step_memory.py models/mini-base --added 8000 \
        --seq 256 --batch 8 --quant nf4

Builds the model with the project's own ``build_model`` (random rows for the new tokens), runs three
AdamW steps (forward, backward, step, ``zero_grad(set_to_none=True)``) and prints JSON:

* ``measured_gib``: peak anonymous resident memory during steps 2-3 minus the anonymous resident memory
  before the model was built (so Python, torch and the libraries are excluded). The peak is the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the file-backed pages
  (``RssFile``: libraries and the safetensors file, which a GPU never holds). Unquantised weights that
  ``from_pretrained`` left mmapped to the file are first copied into memory, where a GPU would hold them.
* ``planned_gib``: ``bailong.plan``'s ``cpu_comparable_gib`` for the same setup: every term but the CUDA
  context and allocator slack.

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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bailong.model.build import build_model  # noqa: E402
from bailong.plan import Setup, architecture, estimate  # noqa: E402
from bailong.train.pretrain import _param_groups, make_optimizer  # noqa: E402

GIB = 1024**3


def status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pretrained")
    p.add_argument("--added", type=int, default=0)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--embeddings", default="new_rows")
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)

    class ModelCfg:  # what bailong.plan.architecture reads
        pretrained, revision = args.pretrained, None

    arch = architecture(ModelCfg)
    setup = Setup(arch=arch, added_vocab=args.added, seq_len=args.seq, micro_batch=args.batch,
                  quantised=args.quant == "nf4", double_quant=True, dtype_bytes=4, autocast=False, lora_r=args.r,
                  lora_dropout=args.dropout, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"),
                  embeddings=args.embeddings, optimizer="adamw", checkpointing=args.checkpointing,
                  strategy="single", world_size=1)
    plan = estimate(setup)

    gc.collect()
    baseline = status_kib("RssAnon")
    vocab = arch.base_vocab + args.added
    rows = {"embed": torch.randn(args.added, arch.hidden) * 0.02, "head": torch.randn(args.added, arch.hidden) * 0.02}
    quant = {"name": args.quant, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
             "quant_storage": "uint8", "skip_modules": ["lm_head"]}
    lora = {"r": args.r, "alpha": 2 * args.r, "dropout": args.dropout, "embeddings": args.embeddings}
    model = build_model(args.pretrained, vocab_size=vocab, num_base=arch.base_vocab, rows=rows if args.added else None,
                        quant=quant, lora=lora, gradient_checkpointing=args.checkpointing)
    del rows
    with torch.no_grad():  # weights still mmapped from the safetensors file -> ordinary memory
        for param in model.parameters():
            if type(param) is torch.nn.Parameter:
                param.data = param.data.clone()
    opt = make_optimizer("adamw", _param_groups(model, 1e-4, None, 0.0), (0.9, 0.95))
    batch = torch.randint(0, vocab, (args.batch, args.seq))

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # first step allocates the optimizer state
    gc.collect()
    static = status_kib("RssAnon")
    reset_peak()
    file_pages = status_kib("RssFile")
    for _ in range(2):
        step()
    peak = status_kib("VmHWM") - file_pages
    measured = (peak - baseline) / 1024**2
    planned = plan.cpu_comparable_gib
    print(json.dumps({
        "measured_gib": measured, "planned_gib": planned, "error": (planned - measured) / measured,
        "measured_static_gib": (static - baseline) / 1024**2,
        "planned_static_gib": sum(v for k, v in plan.components_gib.items()
                                  if not k.startswith(("activations", "logits", "cuda", "gradients"))),
        "planned_components_gib": plan.components_gib, "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "args": vars(args),
    }, indent=2))


if __name__ == "__main__":
    main()
