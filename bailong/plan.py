"""Memory and time planner: what a config will need on a GPU, before anything is loaded.

    python -m bailong.plan experiment=bailong_7b                 # table + fit per GPU class
    python -m bailong.plan experiment=bailong_7b lora.r=64 --json

The estimate is built from what autograd actually keeps for this stack (peft LoRA on bitsandbytes
``Linear4bit`` in a Llama), term by term, so each number can be checked (docs/scale.md):

* static: 4-bit weights (0.5 byte/param + double-quantised absmax), the unquantised embedding, head and
  norms (upcast to fp32 by ``prepare_model_for_kbit_training``), LoRA and new-row parameters (fp32),
  their gradients and optimizer state (AdamW: 8 bytes/param; 8-bit AdamW: 2);
* activations: per layer per token, the tensors saved for backward (RMSNorm inputs in fp32, LoRA dropout
  masks and inputs, RoPE'd q/k/v and the attention output, SwiGLU's gate/up/product), or with gradient
  checkpointing only each layer's input plus one recomputed layer; the head's merged weight; the logits,
  whose loss upcasts to fp32 (3 x tokens x vocab x 4 bytes at the start of backward);
* GPU only: the CUDA context and allocator slack (``cuda_overhead``), excluded when compared with a CPU.

Measured against CPU training steps in tests/test_plan.py (benchmarks/step_memory.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GIB = 1024**3

# Architectures of hub bases, so a plan needs neither the network nor the weights.
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                     tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                      num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                                      tie_word_embeddings=False),
}
# name: (memory GiB, dense bf16 tensor TFLOP/s from the vendor datasheet)
GPUS = {
    "rtx4090": (24, 165.0), "a10": (24, 125.0), "l4": (24, 121.0),
    "a100-40gb": (40, 312.0), "a100-80gb": (80, 312.0), "h100-80gb": (80, 989.0),
}
FIT_CLASSES = (24, 40, 80)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    base_vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def architecture(model_cfg) -> Architecture:
    """Read config.json of a local base, or the table above for a hub id; never loads weights."""
    src = str(model_cfg.pretrained)
    config_file = Path(src) / "config.json"
    if config_file.is_file():
        c = json.loads(config_file.read_text())
    elif src in KNOWN_ARCHITECTURES:
        c = KNOWN_ARCHITECTURES[src]
    else:
        from transformers import AutoConfig  # downloads config.json only (a few KB)

        c = AutoConfig.from_pretrained(src, revision=model_cfg.revision).to_dict()
    if c.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model.pretrained={src}: the planner models Llama-style decoders, got {c['model_type']}")
    return Architecture(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                        c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"],
                        c["vocab_size"], bool(c.get("tie_word_embeddings", False)))


@dataclass
class Setup:
    """The config keys the estimate depends on, in plain numbers."""

    arch: Architecture
    added_vocab: int
    seq_len: int
    micro_batch: int
    quantised: bool
    double_quant: bool
    dtype_bytes: int  # unquantised weights as loaded (model.dtype)
    autocast: bool  # bf16/16-mixed precision
    lora_r: int
    lora_dropout: float
    targets: tuple[str, ...]
    embeddings: str
    optimizer: str
    checkpointing: bool
    strategy: str  # single | ddp | fsdp
    world_size: int
    accumulate: int = 1  # micro-batches per optimizer step
    upcast: bool = True  # prepare_model_for_kbit_training's fp32 upcast; FSDP-QLoRA keeps the storage dtype

    @property
    def param_bytes(self) -> int:
        """Bytes of every unquantised parameter (embeddings, head, norms, LoRA, new rows) as trained."""
        return 4 if (self.quantised and self.upcast) else self.dtype_bytes

    @property
    def vocab(self) -> int:
        return self.arch.base_vocab + self.added_vocab

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


def setup_from_config(cfg) -> Setup:
    strategy = cfg.trainer.strategy
    name = str(strategy.get("_target_", "") if hasattr(strategy, "get") else strategy).lower()
    kind = "fsdp" if "fsdp" in name else "ddp" if "ddp" in name else "single"
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    precision = str(cfg.trainer.precision)
    if cfg.lora.embeddings not in ("new_rows", "full", "lora", "frozen"):
        raise ValueError(f"lora.embeddings={cfg.lora.embeddings!r}: expected new_rows, full, lora or frozen")
    if cfg.train.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"train.optimizer={cfg.train.optimizer!r}: expected one of {', '.join(OPTIMIZER_BYTES)}")
    return Setup(
        arch=architecture(cfg.model), added_vocab=cfg.tokenizer.added_vocab, seq_len=cfg.data.seq_len,
        micro_batch=cfg.data.batch_size, quantised=cfg.quant.name == "nf4", double_quant=cfg.quant.get("double_quant", True),
        dtype_bytes=DTYPE_BYTES[cfg.model.dtype], autocast=precision in ("bf16-mixed", "16-mixed", "bf16", "16"),
        lora_r=cfg.lora.r, lora_dropout=cfg.lora.dropout, targets=tuple(cfg.lora.target_modules),
        embeddings=cfg.lora.embeddings, optimizer=cfg.train.optimizer, checkpointing=cfg.train.gradient_checkpointing,
        strategy=kind, world_size=devices * cfg.trainer.num_nodes if kind != "single" else 1,
        accumulate=cfg.trainer.accumulate_grad_batches, upcast=cfg.quant.get("quant_storage", "uint8") == "uint8",
    )


def static_bytes(s: Setup) -> dict[str, float]:
    """Weights, trainable parameters, their gradients and optimizer state (per GPU)."""
    a, h, v, n_new = s.arch, s.arch.hidden, s.vocab, s.added_vocab
    linear = a.layers * sum(i * o for i, o in a.projection_shapes().values())
    # NF4 packs 2 params/byte; one absmax per 64-block: 8-bit + a fp32 per 256 absmax when double-quantised
    per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64) if s.quantised else s.dtype_bytes
    other_bytes = s.param_bytes
    matrices = 1 if a.tied else 2
    unquantised = (matrices * v * h + (2 * a.layers + 1) * h) * other_bytes
    shapes = a.projection_shapes()
    lora = a.layers * sum(s.lora_r * (shapes[t][0] + shapes[t][1]) for t in s.targets if t in shapes)
    extra_buffers = 0
    if s.embeddings == "new_rows":  # peft TrainableTokens: a delta per new row + the original rows kept
        rows = matrices * n_new * h
        trainable, extra_buffers = lora + rows, rows * other_bytes
    elif s.embeddings == "full":  # modules_to_save: a trainable copy of both matrices
        trainable = lora + matrices * v * h
    elif s.embeddings == "lora":
        trainable = lora + matrices * s.lora_r * (v + h)
    else:
        trainable = lora
    shard = s.world_size if s.strategy == "fsdp" else 1
    out = {
        "weights_4bit" if s.quantised else "weights_linear": linear * per_param / shard,
        "weights_unquantised": (unquantised + extra_buffers) / shard,
        "trainable_params": trainable * s.param_bytes / shard,
        "gradients": trainable * s.param_bytes / shard,
        # AdamW's states take the parameter's dtype; 8-bit AdamW is 1 byte per state whatever the dtype
        "optimizer_state": trainable * OPTIMIZER_BYTES[s.optimizer] * (s.param_bytes / 4 if
                                                                        OPTIMIZER_BYTES[s.optimizer] == 8 else 1) / shard,
    }
    # DDP: no term; conf/trainer/ddp.yaml sets gradient_as_bucket_view, so gradients live in the buckets
    if s.strategy == "fsdp":  # gathered for compute: one decoder layer (+ one prefetched) and the root unit
        # (embedding, head, final norm: not wrapped per layer, so unsharded for the whole step)
        out["fsdp_gathered"] = 2 * linear / a.layers * per_param + unquantised
    return out


def layer_activation_bytes_per_token(s: Setup) -> float:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    a = s.arch
    h, kv, i = a.hidden, a.kv_dim, a.intermediate
    res = s.param_bytes  # residual stream / norm outputs follow the embedding and norm weights
    half = 2 if s.autocast else None

    def proj_out(in_bytes: int) -> int:  # Linear4bit casts its output back to the input dtype
        return in_bytes if s.quantised else (half or s.dtype_bytes)

    qkv = proj_out(res)
    sdpa_in = half or qkv
    mlp = proj_out(res)
    inputs = {"q_proj": (h, res, "x1"), "k_proj": (h, res, "x1"), "v_proj": (h, res, "x1"),
              "o_proj": (h, sdpa_in, "attn"), "gate_proj": (h, res, "x2"), "up_proj": (h, res, "x2"),
              "down_proj": (i, mlp, "prod")}
    total = 2 * h * 4  # the two RMSNorms keep their fp32 input
    total += (h + 2 * kv) * sdpa_in + h * sdpa_in  # attention keeps RoPE'd q, k, v and its output (= o_proj input)
    total += 4 * i * mlp  # SwiGLU: gate out, silu(gate), up out, their product (= down_proj input)
    shared_saved = {"attn", "prod"}  # already counted above
    for name, (width, xb, shared) in inputs.items():
        lora = name in s.targets
        cast = s.autocast and xb != 2  # autocast saves a bf16 copy of an fp32 input, per module
        if not s.quantised:  # a plain nn.Linear keeps its input (4-bit matmul keeps nothing)
            if cast:
                total += width * 2
            else:
                shared_saved.add(shared)
        if lora:
            if s.lora_dropout > 0:
                total += width  # dropout mask (bool)
                total += width * (2 if cast else xb)  # lora_A's input: the dropped-out copy
            elif cast:
                total += width * 2
            else:
                shared_saved.add(shared)
            total += s.lora_r * (half or s.param_bytes)  # lora_B's input
    total += sum(h * res for name in ("x1", "x2") if name in shared_saved)
    return total


def activation_bytes(s: Setup) -> dict[str, float]:
    a, t, v, h = s.arch, s.tokens, s.vocab, s.arch.hidden
    per_layer = layer_activation_bytes_per_token(s) * t
    res = s.param_bytes
    recomputed = 0.0
    if s.checkpointing:  # each layer's input kept; one layer recomputed at a time in backward
        layers = a.layers * t * h * res
    else:
        layers = a.layers * per_layer
    head_weight = 0.0
    if s.embeddings == "new_rows" or s.autocast:  # F.linear keeps the merged (or bf16-cast) head matrix
        head_weight = v * h * (2 if s.autocast else s.param_bytes)
    # final norm input (fp32) and head input; the loss upcasts logits to fp32: at the start of backward
    # the log-softmax output, its incoming gradient and its input gradient coexist
    head = t * h * (4 + res) + head_weight
    logits = 3 * t * v * 4 + (t * v * 2 if s.autocast else 0)
    if s.checkpointing:  # a layer is recomputed after the logits are freed: only its excess adds to the peak
        recomputed = max(0.0, per_layer - logits)
    return {"activations_layers": layers, "activations_recomputed_layer": recomputed, "activations_head": head,
            "logits_and_loss": logits}


def step_flops(s: Setup) -> float:
    """Forward 2N, backward 2N (input gradients only: the base is frozen), +2N recompute when checkpointing."""
    a = s.arch
    n = a.layers * sum(i * o for i, o in a.projection_shapes().values()) + s.vocab * a.hidden
    attention = a.layers * 2 * s.seq_len * a.hidden  # causal QK^T and AV per token, forward
    passes = 3 + (1 if s.checkpointing else 0)  # forward + 2x backward (+ recompute)
    return s.tokens * passes * (2 * n + attention)


@dataclass
class Plan:
    components_gib: dict[str, float]
    cpu_comparable_gib: float  # everything but the CUDA context and allocator slack
    total_gib: float
    fits: dict[str, bool]
    step_seconds: float  # one optimizer step: accumulate x micro-batch
    tokens_per_step: int  # all GPUs, one optimizer step
    total_gib_checkpointing_flipped: float  # the same config with train.gradient_checkpointing toggled
    gpu: str
    assumed_mfu: float
    setup: dict


def estimate(s: Setup, gpu: str = "a100-80gb", mfu: float = 0.35, cuda_context_gib: float = 0.75,
             allocator_slack: float = 0.05) -> Plan:
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r}: expected one of {', '.join(GPUS)}")
    parts = {**static_bytes(s), **activation_bytes(s)}
    comparable = sum(parts.values())
    parts["cuda_overhead"] = cuda_context_gib * GIB + allocator_slack * comparable
    total = sum(parts.values())
    seconds = s.accumulate * step_flops(s) / (GPUS[gpu][1] * 1e12 * mfu)
    flipped = replace(s, checkpointing=not s.checkpointing)
    flipped_total = sum({**static_bytes(flipped), **activation_bytes(flipped)}.values()) * (1 + allocator_slack)
    return Plan(components_gib={k: v / GIB for k, v in parts.items()}, cpu_comparable_gib=comparable / GIB,
                total_gib=total / GIB, fits={f"{g}GB": total / GIB <= g for g in FIT_CLASSES},
                step_seconds=seconds, tokens_per_step=s.tokens * s.world_size * s.accumulate, gpu=gpu,
                assumed_mfu=mfu, total_gib_checkpointing_flipped=(flipped_total + cuda_context_gib * GIB) / GIB,
                setup={**asdict(s), "vocab": s.vocab})


def render(plan: Plan) -> str:
    s = plan.setup
    lines = [f"model {s['arch']['hidden']}h x {s['arch']['layers']} layers, vocab {s['vocab']}, "
             f"{'NF4' if s['quantised'] else 'unquantised'} + LoRA r{s['lora_r']}, seq {s['seq_len']} x micro-batch "
             f"{s['micro_batch']}, checkpointing {'on' if s['checkpointing'] else 'off'}, "
             f"{s['strategy']} x{s['world_size']}", "per-GPU memory (GiB):"]
    lines += [f"  {k:<30}{v:8.2f}" for k, v in plan.components_gib.items()]
    lines += [f"  {'total':<30}{plan.total_gib:8.2f}",
              f"  (gradient checkpointing {'off' if s['checkpointing'] else 'on'}: "
              f"{plan.total_gib_checkpointing_flipped:.2f} GiB)", ""]
    for name, ok in plan.fits.items():
        lines.append(f"  {name:>5}: {'fits' if ok else 'WARNING: does not fit'}")
    lines.append(f"time per step: {plan.step_seconds:.2f} s on {plan.gpu} at {plan.assumed_mfu:.0%} of its "
                 f"{GPUS[plan.gpu][1]:.0f} bf16 TFLOP/s ({plan.tokens_per_step:,} tokens/step, "
                 f"{s['accumulate']} micro-batches per GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bailong.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="GPU for the time estimate")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of peak bf16 throughput")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    from bailong.config import compose_config  # hydra only: nothing of the model is loaded

    plan = estimate(setup_from_config(compose_config(args.overrides)), gpu=args.gpu, mfu=args.mfu)
    print(json.dumps(asdict(plan), indent=2) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
