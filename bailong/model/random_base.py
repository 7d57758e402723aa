"""A base with a real model's exact shapes and seeded random weights, built on the fly (no download).

    model.random_base: {architecture: llama2_7b, num_layers: 2, seed: 0}

``ensure_random_base`` writes a Hugging Face model directory at ``model.pretrained`` the first time a run
needs it: ``config.json`` (the architecture's real config, with ``num_hidden_layers`` set to
``num_layers``), ``model.safetensors`` (sharded past ``SHARD_BYTES``; bfloat16) and the tokenizer files
(``tokenizer.model``, which bailong's tokenizer extension reads, plus what ``AutoTokenizer`` loads). It
exercises every width-dependent path of the pipeline (59,241 x 4,096 embedding rows, 11,008-wide
projections, NF4 + LoRA r64) at a depth the machine can afford; its bits/char mean nothing.

Weights are drawn as transformers initialises a Llama (projections, embedding and head ~ N(0,
``initializer_range``), RMSNorm gains 1) but only once: the skeleton is built on the meta device and
each tensor is filled on ``device`` by its own generator, seeded from ``(seed, parameter name)``. So the
same seed gives the same bytes, and a model's first layers equal those of a deeper model of the same
seed. CPU and CUDA generators draw different streams: the device is recorded in ``random_base.json``.

Concurrent callers (DDP ranks, sweep jobs) take a file lock beside the directory, re-check, build into a
temporary sibling and rename it into place: a directory at ``model.pretrained`` is always complete.

The table holds only plain data, so the planner reads it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bailong.model.config import ModelConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "random_base.json"
SHARD_BYTES = 5 * 10**9  # the hub's usual shard size; a 2-layer 7B-width model is one 1.3 GB file

# The Llama-2 tokenizer layout (32,000 pieces: <unk> <s> </s>, 256 byte pieces, BPE, byte fallback). The
# Llama-2 file itself is gated, so the shipped Apache-2.0 Mistral v1 model stands in (data/README.md).
TOKENIZERS = {"llama2": "data/tokenizers/mistral-v1.model"}

# config.json of meta-llama/Llama-2-7b-hf (and -13b-hf) where it differs from LlamaConfig's defaults or matters
LLAMA2 = dict(
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    initializer_range=0.02,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    attention_bias=False,
    mlp_bias=False,
)
# name: (model_type, tokenizer, config); num_hidden_layers is the real depth, replaced by random_base.num_layers
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama2_7b": (
        "llama",
        "llama2",
        dict(
            LLAMA2,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    ),
    "llama2_13b": (
        "llama",
        "llama2",
        dict(
            LLAMA2,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
        ),
    ),
}


def random_base_spec(model: ModelConfig) -> dict[str, Any] | None:
    """``{architecture, num_layers, seed}`` of ``model.random_base``; None if unset."""
    rb = model.random_base
    if rb is None:
        return None
    if rb.architecture not in ARCHITECTURES:
        raise ValueError(
            f"model.random_base.architecture={rb.architecture!r}: expected one of {', '.join(ARCHITECTURES)}"
        )
    return {"architecture": rb.architecture, "num_layers": rb.num_layers, "seed": rb.seed}


def architecture_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json keys of ``spec``'s model (plain data: what the planner reads without building)."""
    model_type, _, config = ARCHITECTURES[spec["architecture"]]
    return {"model_type": model_type, **config, "num_hidden_layers": spec["num_layers"]}


def ensure_random_base(model: ModelConfig, *, device: str | None = None) -> Path:
    """Materialise ``model.random_base`` at ``model.pretrained`` unless it is already there; the path.

    A no-op returning ``Path(pretrained)`` when ``random_base`` is null. ``device`` (default CPU) is where
    the weights are drawn: ``"cuda"`` builds a 32-layer 7B in seconds.
    """
    target = Path(model.pretrained)
    spec = random_base_spec(model)
    if spec is None:
        return target
    if _complete(target, spec):
        return target
    from filelock import FileLock  # installed with huggingface_hub

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _complete(target, spec):  # another process built it while we waited
            return target
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            write_random_base(tmp, spec, device=device or "cpu")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "built random %s base (%d layers, seed %d) at %s in %.1f s",
            spec["architecture"],
            spec["num_layers"],
            spec["seed"],
            target,
            time.perf_counter() - started,
        )
    return target


def _complete(target: Path, spec: Mapping[str, Any]) -> bool:
    """Whether ``target`` holds the random base ``spec`` asks for; an error if it holds anything else."""
    if not target.exists():
        return False
    manifest = target / MANIFEST
    if not manifest.is_file():
        raise FileExistsError(
            f"model.pretrained={target} exists but was not written by ensure_random_base "
            f"(no {MANIFEST}); point model.pretrained elsewhere or set model.random_base=null"
        )
    built = json.loads(manifest.read_text())
    if any(built.get(k) != spec[k] for k in ("architecture", "num_layers", "seed")):
        raise FileExistsError(
            f"model.pretrained={target} holds a random base built for "
            f"{ {k: built.get(k) for k in spec} }, not {dict(spec)}: give each its own directory"
        )
    return True


def _tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed per (seed, parameter name): tensors do not depend on each other's draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def write_random_base(out_dir: Path, spec: Mapping[str, Any], *, device: str = "cpu") -> None:
    """config.json, bfloat16 safetensors (sharded past SHARD_BYTES), tokenizer files and the manifest."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from bailong.model.mini_base import save_tokenizer

    out_dir = Path(out_dir)
    _, tokenizer, _ = ARCHITECTURES[spec["architecture"]]
    sp_model = (ROOT / TOKENIZERS[tokenizer]).read_bytes()
    save_tokenizer(sp_model, out_dir)

    keys = architecture_config(spec)
    config = AutoConfig.for_model(keys.pop("model_type"), **keys, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"] if config.model_type == "llama" else None
    with torch.device("meta"):  # shapes and names only: nothing is allocated or initialised here
        skeleton = AutoModelForCausalLM.from_config(config)
    kinds = {
        f"{m}.{p}" if m else p: type(mod).__name__
        for m, mod in skeleton.named_modules()
        for p, _ in mod.named_parameters(recurse=False)
    }
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    std = config.initializer_range

    def draw(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
        if kinds[name].endswith("RMSNorm"):
            return t.fill_(1.0).cpu()
        if kinds[name] not in ("Linear", "Embedding"):
            raise ValueError(f"{name}: no init rule for a {kinds[name]} parameter")
        gen = torch.Generator(device=t.device).manual_seed(_tensor_seed(spec["seed"], name))
        return t.normal_(0.0, std, generator=gen).cpu()

    # shard on shapes alone, then draw one shard at a time: memory holds one shard, not the model
    meta_state = {name: p.to(torch.bfloat16) for name, p in skeleton.state_dict().items()}
    split = split_torch_state_dict_into_shards(meta_state, max_shard_size=SHARD_BYTES)
    workers = torch.get_num_threads() if torch.device(device).type == "cpu" else 1  # draws release the GIL
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for filename, names in split.filename_to_tensors.items():
            shard = dict(zip(names, pool.map(draw, names)))
            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(p.numel() * 2 for p in meta_state.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    manifest = {
        **spec,
        "device": torch.device(device).type,
        "torch": torch.__version__,
        "tokenizer": TOKENIZERS[tokenizer],
        "parameters": sum(p.numel() for p in meta_state.values()),
        "init": f"normal(0, {std}) per tensor seeded by sha256(seed:name); RMSNorm gains 1; bfloat16",
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _readable(out_dir)


def _readable(out_dir: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a shared cache needs the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    out_dir.chmod(0o777 & ~umask)
    for f in out_dir.iterdir():
        f.chmod(0o666 & ~umask)
