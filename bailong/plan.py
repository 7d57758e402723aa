"""Memory and time planner: what a config will need on a GPU, before anything is loaded.

    python -m bailong.plan experiment=bailong_7b                 # table + fit per GPU class
    python -m bailong.plan experiment=bailong_7b lora.r=64 --json
    python -m bailong.plan experiment=bailong_7b finetune=full quant=none   # full fine-tuning

The estimate is built from what this stack actually allocates (peft LoRA on bitsandbytes ``Linear4bit`` in a
Llama, trained through ``bailong.train.loss.causal_lm_loss``), term by term, so each number can be checked
(docs/scale.md). The peak of a step is the resident state plus the largest of its moments:

* static (always resident): 4-bit weights (0.5 byte/param + double-quantised absmax), the unquantised
  embedding, head (rows padded to ``model.pad_vocab_to_multiple_of``) and norms (in ``model.dtype``:
  ``build_model`` undoes ``prepare_model_for_kbit_training``'s fp32 upcast for the base's own weights), LoRA and
  new-row parameters, the original rows peft keeps, optimizer
  state (2 states per trainable parameter: the parameter's dtype for AdamW, 1 byte + block absmax for 8-bit),
  DDP's gradient buckets;
* forward, at the last chunk of the fused loss: what each layer's ops keep for backward (RMSNorm inputs in
  fp32, RoPE'd q/k/v and the attention output, SwiGLU's gate output, silu(gate) and up output, LoRA dropout
  masks and inputs, autocast's bf16 weight casts; with gradient checkpointing only each layer's input), the
  final norm's input and output, and the loss's buffers: the head pieces cast to the matmul dtype, the
  hidden-state gradient, the fp32 gradient of the trained head rows and its per-chunk product, one chunk of
  ``TRAIN_LOGIT_BUDGET`` logits;
* backward: the loss's saved gradients turned into parameter gradients, one recomputed layer under
  checkpointing, and at the end the gradient of the embedded positions beside every parameter gradient;
* optimizer step: every parameter gradient (torch's fused AdamW and bitsandbytes' optimizers step in place);
* GPU only: the CUDA context and allocator slack (``cuda_overhead``), excluded when compared with a CPU.

``finetune=full`` trains every weight in ``model.dtype`` (no LoRA, no quantisation): weights, gradients and
optimizer state each cover the whole model.

Measured against CPU training steps in tests/test_plan.py (benchmarks/step_memory.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bailong.errors import ConfigError
from bailong.model.config import ALL_LINEAR, LORA_TARGETS
from bailong.model.random_base import ARCHITECTURES, architecture_config, random_base_spec
from bailong.train.config import OPTIMIZERS

GIB = 1024**3

# Architectures of hub bases, so a plan needs neither the network nor the weights (the random-base table's
# entries are those models' config.json values)
KNOWN_ARCHITECTURES = {
    **{
        hub: ARCHITECTURES[name][2]
        for hub, name in (("meta-llama/Llama-2-7b-hf", "llama2_7b"), ("meta-llama/Llama-2-13b-hf", "llama2_13b"))
    },
    # the byte-level bases of conf/model (and Mistral v1): grouped-query attention, larger vocabularies
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,  # the embedding's rows; its tokenizer has 151,665 tokens (the rest is padding)
        tie_word_embeddings=False,
    ),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
# name: (memory GiB, dense bf16 tensor TFLOP/s from the vendor datasheet)
GPUS = {
    "rtx4090": (24, 165.0),
    "a10": (24, 125.0),
    "l4": (24, 121.0),
    "a100-40gb": (40, 312.0),
    "a100-80gb": (80, 312.0),
    "h100-80gb": (80, 989.0),
}
FIT_CLASSES = (24, 40, 80)
PROJECTIONS = LORA_TARGETS  # the Llama block's projections, each a LoRA target by default
EIGHT_BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizers: one fp32 absmax per 256 values of each state
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAIN_LOGIT_BUDGET = 2**24  # bailong.train.loss.TRAIN_LOGIT_BUDGET (a test keeps them equal; no torch import here)


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
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def architecture(model_cfg) -> Architecture:
    """The base's shapes without loading weights: its config.json if the directory exists, else the random
    base's table (``model.random_base``, not built yet), else the table above for a hub id, else the hub's
    config.json."""
    src = str(model_cfg.pretrained)
    config_file = Path(src) / "config.json"
    spec = random_base_spec(model_cfg)
    if config_file.is_file():
        c = json.loads(config_file.read_text())
    elif spec is not None:
        c = architecture_config(spec)
    elif src in KNOWN_ARCHITECTURES:
        c = KNOWN_ARCHITECTURES[src]
    else:
        from transformers import AutoConfig  # downloads config.json only (a few KB)

        c = AutoConfig.from_pretrained(src, revision=model_cfg.revision).to_dict()
    if c.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model.pretrained={src}: the planner models Llama-style decoders, got {c['model_type']}")
    return Architecture(
        c["hidden_size"],
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c.get("num_key_value_heads") or c["num_attention_heads"],
        c["intermediate_size"],
        c["vocab_size"],
        bool(c.get("tie_word_embeddings", False)),
    )


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
    pad_multiple: int = 1  # model.pad_vocab_to_multiple_of: embedding/head rows rounded up
    full_finetune: bool = False  # finetune=full: every weight trains in model.dtype, no LoRA, no quantisation
    shared_dropout_mask: bool = (
        False  # lora.shared_dropout_mask: one mask and dropped copy per input, not per projection
    )
    # where the step runs: "cuda" (what the plan is for) or "cpu" (the benchmark that checks it). torch differs:
    # on CUDA, AdamW steps all tensors at once and dropout keeps a bool mask; on the CPU, AdamW steps tensor
    # by tensor and dropout keeps its mask in the input's dtype
    device: str = "cuda"

    def __post_init__(self):
        if self.full_finetune and self.quantised:
            raise ValueError("finetune=full with quant=nf4: 4-bit weights cannot train; use quant=none")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device={self.device!r}: expected cuda or cpu")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")

    @property
    def param_bytes(self) -> int:
        """Bytes of every unquantised parameter (embeddings, head, norms, LoRA, new rows) as trained."""
        return 4 if (self.quantised and self.upcast) else self.dtype_bytes

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream and the norm outputs: the dtype of the embedding that feeds it
        (the base's own, in ``model.dtype``; ``lora.embeddings=full``'s trainable float32 copy)."""
        full_copy = self.embeddings == "full" and not self.full_finetune
        return self.param_bytes if full_copy else self.dtype_bytes

    @property
    def vocab(self) -> int:
        """Tokens: the base vocabulary plus the appended pieces (what the loss's softmax covers)."""
        return self.arch.base_vocab + self.added_vocab

    @property
    def rows(self) -> int:
        """Rows of the embedding and head matrices: the vocabulary rounded up to ``pad_multiple``."""
        return -(-self.vocab // self.pad_multiple) * self.pad_multiple

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def head_rows_trained(self) -> int:
        """Head rows whose gradient the fused loss computes: the new rows, the whole matrix, or none."""
        if self.full_finetune or self.embeddings == "full":
            return self.rows
        return self.added_vocab if self.embeddings == "new_rows" else 0


def setup_from_config(cfg, device: str = "cuda") -> Setup:
    from omegaconf import OmegaConf

    strategy = cfg.trainer.strategy
    name = str(strategy.get("_target_", "") if hasattr(strategy, "get") else strategy).lower()
    kind = "fsdp" if "fsdp" in name else "ddp" if "ddp" in name else "single"
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    precision = str(cfg.trainer.precision)
    full = OmegaConf.select(cfg, "finetune.name", default="lora") == "full"
    if not full and cfg.lora.embeddings not in ("new_rows", "full", "lora", "frozen"):
        raise ValueError(f"lora.embeddings={cfg.lora.embeddings!r}: expected new_rows, full, lora or frozen")
    if not full and cfg.lora.get("use_dora", False):
        # DoRA re-derives each target's weight norm from the dequantised matrix every forward: memory the
        # benchmark has not measured, so no figure is given rather than LoRA's
        raise ConfigError("lora.use_dora=true: the planner models LoRA and full fine-tuning only, not DoRA")
    targets = cfg.lora.target_modules
    return Setup(
        arch=architecture(cfg.model),
        added_vocab=cfg.tokenizer.added_vocab,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.data.batch_size,
        quantised=cfg.quant.name == "nf4",
        double_quant=cfg.quant.get("double_quant", True),
        dtype_bytes=DTYPE_BYTES[cfg.model.dtype],
        autocast=precision in ("bf16-mixed", "16-mixed", "bf16", "16"),
        lora_r=cfg.lora.r,
        lora_dropout=cfg.lora.dropout,
        shared_dropout_mask=cfg.lora.shared_dropout_mask,
        targets=() if full else PROJECTIONS if targets == ALL_LINEAR else tuple(targets),
        embeddings=cfg.lora.embeddings,
        optimizer=cfg.train.optimizer,
        checkpointing=cfg.train.gradient_checkpointing,
        strategy=kind,
        world_size=devices * cfg.trainer.num_nodes if kind != "single" else 1,
        accumulate=cfg.trainer.accumulate_grad_batches,
        upcast=cfg.quant.get("quant_storage", "uint8") == "uint8",
        pad_multiple=cfg.model.get("pad_vocab_to_multiple_of", 1) or 1,
        full_finetune=full,
        device=device,
    )


def parameter_counts(s: Setup) -> dict[str, int]:
    """Parameters by kind: ``linear`` projections, ``matrices`` (embedding + head rows, padded), ``norms``,
    ``lora``, ``rows`` (peft's trainable new-row deltas) and ``trainable`` (what gets gradients and state)."""
    a, h = s.arch, s.arch.hidden
    shapes = a.projection_shapes()
    matrices = 1 if a.tied else 2
    counts = {
        "linear": a.layers * sum(i * o for i, o in shapes.values()),
        "matrices": matrices * s.rows * h,
        "norms": (2 * a.layers + 1) * h,
        "lora": 0,
        "rows": 0,
    }
    if s.full_finetune:
        counts["trainable"] = counts["linear"] + counts["matrices"] + counts["norms"]
        return counts
    counts["lora"] = a.layers * sum(s.lora_r * (shapes[t][0] + shapes[t][1]) for t in s.targets if t in shapes)
    if s.embeddings == "new_rows":  # peft TrainableTokens: a delta per new row of each matrix
        counts["rows"] = matrices * s.added_vocab * h
    elif s.embeddings == "full":  # modules_to_save: a trainable copy of both matrices
        counts["rows"] = counts["matrices"]
    elif s.embeddings == "lora":
        counts["lora"] += matrices * s.lora_r * (s.rows + h)
    counts["trainable"] = counts["lora"] + counts["rows"]
    return counts


def optimizer_state_bytes_per_param(s: Setup) -> float:
    """Two states per parameter: AdamW's take the parameter's dtype; 8-bit ones a byte + block absmax."""
    if s.optimizer in ("adamw", "paged_adamw"):
        return 2 * s.param_bytes
    return 2 * (1 + 4 / EIGHT_BIT_BLOCK)


def static_bytes(s: Setup) -> dict[str, float]:
    """What stays resident through a step (per GPU): weights, trainable parameters, optimizer state (and under
    DDP the gradient buckets)."""
    a = s.arch
    n = parameter_counts(s)
    # NF4 packs 2 params/byte; one absmax per 64-block: 8-bit + a fp32 per 256 absmax when double-quantised
    per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64) if s.quantised else s.dtype_bytes
    # the base's own unquantised weights stay in model.dtype (bailong.model.build.keep_base_in_model_dtype)
    unquantised = (n["matrices"] + n["norms"]) * s.dtype_bytes
    # peft TrainableTokens keeps the original values of the new rows beside the deltas
    originals = n["rows"] * s.param_bytes if s.embeddings == "new_rows" and not s.full_finetune else 0
    shard = s.world_size if s.strategy == "fsdp" else 1
    # full fine-tuning: the weights are the trainable parameters, so no separate copy
    separate = 0 if s.full_finetune else n["trainable"]
    out = {
        "weights_4bit" if s.quantised else "weights_linear": n["linear"] * per_param / shard,
        "weights_unquantised": (unquantised + originals) / shard,
        "trainable_params": separate * s.param_bytes / shard,
        "optimizer_state": n["trainable"] * optimizer_state_bytes_per_param(s) / shard,
    }
    if s.strategy == "ddp":  # DDP allocates its all-reduce buckets up front; gradient_as_bucket_view
        # (conf/trainer/ddp.yaml) makes every .grad a view into them, so the gradients cost nothing more
        out["gradient_buckets"] = n["trainable"] * s.param_bytes
    if s.strategy == "fsdp":  # gathered for compute: one decoder layer (+ one prefetched) and the root unit
        # (embedding, head, final norm: not wrapped per layer, so unsharded for the whole step)
        out["fsdp_gathered"] = 2 * n["linear"] / a.layers * per_param + unquantised
    return out


def gradient_bytes(s: Setup) -> float:
    """Every parameter gradient (same dtype as its parameter): alive from backward to ``zero_grad`` (under DDP
    they live in the static gradient buckets instead)."""
    if s.strategy == "ddp":
        return 0
    shard = s.world_size if s.strategy == "fsdp" else 1
    return parameter_counts(s)["trainable"] * s.param_bytes / shard


def layer_activation_bytes_per_token(s: Setup) -> float:
    """Bytes one decoder layer keeps for backward, per token: what each op saves (see the module docstring)."""
    a = s.arch
    h, kv, i = a.hidden, a.kv_dim, a.intermediate
    res = s.residual_bytes
    half = 2 if s.autocast else None

    def proj_out(in_bytes: int) -> int:  # Linear4bit casts its output back to the input dtype
        return in_bytes if s.quantised else (half or s.dtype_bytes)

    qkv = proj_out(res)
    sdpa_in = half or qkv
    mlp = proj_out(res)
    total = 2 * h * 4  # the two RMSNorms keep their fp32 input
    total += (2 * h + 2 * kv) * sdpa_in  # attention keeps RoPE'd q, k, v and its output
    total += 3 * i * mlp  # SwiGLU: silu keeps gate's output; their product keeps silu(gate) and up's output
    # each projection's input: norm outputs x1 (q, k, v) and x2 (gate, up), o_proj's (a contiguous copy of the
    # attention output) and down_proj's (the SwiGLU product); kept only if a consumer below keeps it
    inputs = {
        "q_proj": (h, res, "x1"),
        "k_proj": (h, res, "x1"),
        "v_proj": (h, res, "x1"),
        "o_proj": (h, sdpa_in, "attn"),
        "gate_proj": (h, res, "x2"),
        "up_proj": (h, res, "x2"),
        "down_proj": (i, mlp, "prod"),
    }
    kept, dropped = set(), set()
    for name, (width, xb, shared) in inputs.items():
        cast = s.autocast and xb != 2  # autocast keeps a bf16 copy of an fp32 input, per module
        # LoRA's input: peft casts it to the adapter's float32 unless autocast runs (the fit turns that cast off
        # under autocast, which casts to bf16 itself: bailong.model.build.follow_autocast)
        lb = xb if s.autocast else max(xb, s.param_bytes)
        if s.full_finetune:  # a trained nn.Linear keeps its input; a frozen one (or a 4-bit matmul) keeps none
            if cast:
                total += width * 2
            else:
                kept.add(shared)
        if name in s.targets:
            if s.lora_dropout > 0:
                if not (s.shared_dropout_mask and shared in dropped):  # a shared mask: once per input
                    total += width * (1 if s.device == "cuda" else lb)  # dropout mask: bool on CUDA, input dtype on CPU
                    total += width * (2 if cast else lb)  # lora_A's input: the dropped-out copy
                    dropped.add(shared)
            elif cast:
                total += width * 2
            elif lb != xb:
                total += width * lb  # peft's float32 copy of the input
            else:
                kept.add(shared)
            total += s.lora_r * (half or s.param_bytes)  # lora_B's input
    widths = {"x1": h * res, "x2": h * res, "attn": h * sdpa_in, "prod": i * mlp}
    return total + sum(widths[name] for name in kept)


def layer_weight_copies(s: Setup) -> tuple[float, float]:
    """Bytes of bf16 weight copies one decoder layer's matmuls keep under autocast: ``(cached, per_call)``.

    Autocast casts each fp32 matrix a matmul uses to bf16 and the matmul keeps the cast to compute its input's
    gradient. Trained matrices (LoRA's, or every projection under full fine-tuning) are cast once and held by
    autocast's cache until the forward ends, checkpointed or not; frozen fp32 projections are cast anew for
    every call and live only as saved tensors. 4-bit weights are dequantised per call and not kept; bf16
    weights need no cast."""
    if not s.autocast:
        return 0, 0
    shapes = s.arch.projection_shapes()
    projections = sum(i * o for i, o in shapes.values())
    fp32_projections = not s.quantised and s.dtype_bytes == 4
    if s.full_finetune:
        return (2 * projections if fp32_projections else 0), 0
    lora = sum(s.lora_r * (i + o) for t, (i, o) in shapes.items() if t in s.targets) if s.param_bytes == 4 else 0
    return 2 * lora, (2 * projections if fp32_projections else 0)


def phase_bytes(s: Setup) -> dict[str, dict[str, float]]:
    """What a step holds beyond the static state at each of its largest moments, by term: ``forward`` (the
    fused loss's last chunk), ``backward_loss`` (the loss's gradients handed back), ``backward_recompute``
    (checkpointing: the last layer recomputed), ``backward_embedding`` (the embedding's gradient, last) and
    ``optimizer`` (the step). The peak of a step is the static state plus the largest of them."""
    a, t, h = s.arch, s.tokens, s.arch.hidden
    pb, res = s.param_bytes, s.residual_bytes
    cached, per_call = layer_weight_copies(s)
    per_layer = layer_activation_bytes_per_token(s) * t + per_call
    saved = {
        "activations_layers": a.layers * (t * h * res if s.checkpointing else per_layer),  # ckpt: inputs
        # the final norm's fp32 input and its output (+ a contiguous copy when rows are cut from a batch)
        "activations_final_norm": t * h * (4 + res) + (t * h * res if s.micro_batch > 1 else 0),
    }
    # autocast's cached bf16 copies of trained fp32 matrices: through the forward; after it only where saved
    forward_copies = {"autocast_weight_copies": a.layers * cached} if cached else {}
    backward_copies = forward_copies if not s.checkpointing else {}
    # the head as stored (the base's in model.dtype; a trained float32 copy) and the dtype its matmuls run in
    head_bytes = pb if (s.embeddings == "full" or s.full_finetune) else s.dtype_bytes
    mm = 2 if s.autocast else head_bytes
    chunk = max(1, TRAIN_LOGIT_BUDGET // s.rows)  # positions per chunk (the loss divides by the padded rows)
    n_rows = s.head_rows_trained
    new_rows = s.embeddings == "new_rows" and not s.full_finetune and s.added_vocab > 0
    phases: dict[str, dict[str, float]] = {}
    if s.full_finetune or s.embeddings != "lora":  # bailong.train.loss's fused linear + cross-entropy
        # the head's pieces cast once per call to the matmul dtype where stored in another: the frozen rows (in
        # model.dtype) and the trained ones (float32 parameters; the whole head under full training)
        whole = s.full_finetune or s.embeddings == "full"
        trained_in_vocab = s.vocab if whole else n_rows
        frozen_cast = (s.vocab - trained_in_vocab) * h * mm if mm != s.dtype_bytes else 0
        phases["forward"] = {
            **saved,
            **forward_copies,
            "loss_head_cast": frozen_cast + (trained_in_vocab * h * mm if mm != pb else 0),
            "loss_grad_hidden": t * h * res,
            "loss_grad_rows": n_rows * h * 4,  # fp32 accumulator of the trained head rows' gradient
            # one chunk's products in the matmul dtype and its fp32 logits (one buffer when the matmul is fp32)
            "loss_logit_chunk": chunk * s.vocab * (4 + (mm if mm != 4 else 0)),
            # a chunk's row gradient in the matmul dtype and widened to fp32 before its sum
            "loss_row_products": n_rows * h * (mm + 4) if mm != 4 else 0,
            "loss_chunk_temporaries": chunk * h * (mm + 4 + 4),  # the chunk's hidden states cast, its gradient
        }
        # the loss node's backward scales its saved gradients in place and hands them back; the head rows' .grad
        # is a new tensor only where the rows are not float32
        phases["backward_loss"] = {
            **saved,
            **backward_copies,
            "loss_saved_gradients": t * h * res + n_rows * h * 4,
            "loss_gradients": n_rows * h * pb if pb != 4 else 0,
        }
    else:  # LoRA on lm_head: chunks under activation checkpointing, logits recomputed in backward
        phases["forward"] = {
            **saved,
            **forward_copies,
            "loss_logit_chunk": chunk * s.vocab * (4 + (2 if s.autocast else 0)),
        }
        phases["backward_loss"] = {
            **saved,
            **backward_copies,
            "loss_recomputed_chunk": 3 * chunk * s.vocab * 4 + t * h * res,
        }
    if s.checkpointing:  # every layer's input, one layer recomputed, the gradient flowing through it
        phases["backward_recompute"] = {
            "activations_layers": saved["activations_layers"],
            "recomputed_layer": per_layer + cached,
            "gradient_stream": 2 * t * h * res,
            "head_row_gradients": n_rows * h * pb,
        }
    # last: the embedding's gradient beside all other gradients. The loss looks the trained rows up apart from the
    # frozen matrix (bailong.train.loss.input_embeddings), so only the gradient at the looked-up positions (in the
    # residual dtype, and widened to the rows' float32) comes before the rows' own, with no dense one over the
    # vocabulary (peft's merged lookup would add rows x hidden in model.dtype here)
    phases["backward_embedding"] = {
        "gradients": gradient_bytes(s),
        "embedding_lookup_gradient": t * h * (res + 4) if new_rows else 0,
    }
    # torch's fused AdamW (bailong.train.pretrain.make_optimizer) and bitsandbytes' optimizers update each tensor in
    # place: nothing beside the gradients
    phases["optimizer"] = {"gradients": gradient_bytes(s)}
    return phases


def step_flops(s: Setup) -> float:
    """Forward 2N and backward 2N (input gradients; + 2N weight gradients under full fine-tuning: a LoRA base
    is frozen), + 2N recompute with checkpointing; causal attention 2·seq·hidden per layer forward, twice that
    backward."""
    a = s.arch
    n = a.layers * sum(i * o for i, o in a.projection_shapes().values()) + s.vocab * a.hidden
    attention = a.layers * 2 * s.seq_len * a.hidden  # causal QK^T and AV per token, forward
    passes = 2 + (1 if s.full_finetune else 0) + (1 if s.checkpointing else 0)
    attention_passes = 3 + (1 if s.checkpointing else 0)
    return s.tokens * (passes * 2 * n + attention_passes * attention)


@dataclass
class Plan:
    components_gib: dict[str, float]  # the static terms, the peak phase's terms and the GPU overhead: sum = total
    cpu_comparable_gib: float  # everything but the CUDA context and allocator slack
    total_gib: float
    fits: dict[str, bool]
    step_seconds: float  # one optimizer step: accumulate x micro-batch
    tokens_per_step: int  # all GPUs, one optimizer step
    total_gib_checkpointing_flipped: float  # the same config with train.gradient_checkpointing toggled
    gpu: str
    assumed_mfu: float
    setup: dict
    static_gib: float = 0.0  # resident through the step
    peak_phase: str = ""  # which moment of the step is the peak
    phases_gib: dict[str, float] | None = None  # static + each moment (CPU-comparable)
    parameters: dict[str, int] | None = None  # parameter_counts


def peak_bytes(s: Setup) -> tuple[dict[str, float], dict[str, dict[str, float]], str]:
    """(static terms, every moment's terms, the peak moment's name)."""
    static, phases = static_bytes(s), phase_bytes(s)
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    return static, phases, peak


def estimate(
    s: Setup, gpu: str = "a100-80gb", mfu: float = 0.35, cuda_context_gib: float = 0.75, allocator_slack: float = 0.05
) -> Plan:
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r}: expected one of {', '.join(GPUS)}")
    static, phases, peak = peak_bytes(s)
    static_total = sum(static.values())
    parts = {**static, **{f"{peak}/{k}": v for k, v in phases[peak].items()}}
    comparable = sum(parts.values())
    parts["cuda_overhead"] = cuda_context_gib * GIB + allocator_slack * comparable
    total = sum(parts.values())
    seconds = s.accumulate * step_flops(s) / (GPUS[gpu][1] * 1e12 * mfu)
    f_static, f_phases, f_peak = peak_bytes(replace(s, checkpointing=not s.checkpointing))
    flipped = (sum(f_static.values()) + sum(f_phases[f_peak].values())) * (1 + allocator_slack)
    return Plan(
        components_gib={k: v / GIB for k, v in parts.items()},
        cpu_comparable_gib=comparable / GIB,
        total_gib=total / GIB,
        fits={f"{g}GB": total / GIB <= g for g in FIT_CLASSES},
        step_seconds=seconds,
        tokens_per_step=s.tokens * s.world_size * s.accumulate,
        gpu=gpu,
        assumed_mfu=mfu,
        total_gib_checkpointing_flipped=(flipped + cuda_context_gib * GIB) / GIB,
        setup={**asdict(s), "vocab": s.vocab, "rows": s.rows},
        static_gib=static_total / GIB,
        peak_phase=peak,
        phases_gib={k: (static_total + sum(v.values())) / GIB for k, v in phases.items()},
        parameters=parameter_counts(s),
    )


def render(plan: Plan) -> str:
    s = plan.setup
    mode = (
        "full fine-tuning"
        if s["full_finetune"]
        else f"{'NF4' if s['quantised'] else 'unquantised'} + LoRA r{s['lora_r']}"
    )
    lines = [
        f"model {s['arch']['hidden']}h x {s['arch']['layers']} layers, vocab {s['vocab']} ({s['rows']} rows), "
        f"{mode}, seq {s['seq_len']} x micro-batch {s['micro_batch']}, "
        f"checkpointing {'on' if s['checkpointing'] else 'off'}, {s['strategy']} x{s['world_size']}",
        f"parameters: {plan.parameters['trainable']:,} trainable",
        "per-GPU memory (GiB):",
    ]
    lines += [f"  {k:<44}{v:8.2f}" for k, v in plan.components_gib.items()]
    lines += [
        f"  {'total':<44}{plan.total_gib:8.2f}",
        "  (each moment of the step, static state included, without the CUDA terms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in plan.phases_gib.items())
        + ")",
        f"  (gradient checkpointing {'off' if s['checkpointing'] else 'on'}: "
        f"{plan.total_gib_checkpointing_flipped:.2f} GiB)",
        "",
    ]
    for name, ok in plan.fits.items():
        lines.append(f"  {name:>5}: {'fits' if ok else 'WARNING: does not fit'}")
    lines.append(
        f"time per step: {plan.step_seconds:.2f} s on {plan.gpu} at {plan.assumed_mfu:.0%} of its "
        f"{GPUS[plan.gpu][1]:.0f} bf16 TFLOP/s ({plan.tokens_per_step:,} tokens/step, "
        f"{s['accumulate']} micro-batches per GPU)"
    )
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
