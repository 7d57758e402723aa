"""LoRA variants peft offers, through bailong's settings: rank-stabilised scaling (``lora.use_rslora``), DoRA
(``lora.use_dora``) and ``lora.target_modules=all-linear``, on the tiny Llama of test_build (4-bit and full
precision) and a tiny GPT-2 (Conv1D projections); logger=tensorboard in an end-to-end run."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from bailong.checks import check_config
from bailong.errors import ConfigError
from bailong.export import export
from bailong.model.adapter import load_adapter, save_adapter
from bailong.model.build import lora_config
from bailong.model.config import LoraConfig
from bailong.plan import setup_from_config
from conftest import trained
from test_build import NF4, NONE, TARGETS, batch, build, lora, make_tiny_base
from test_export import set_compute_dtype
from test_pipeline import SMOKE, run_py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny"))


def first_q_proj(model) -> peft.tuners.lora.LoraLayer:
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("use_rslora, scale", [(False, 8 / 16), (True, 8 / math.sqrt(16))])
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tiny, use_rslora, scale):
    """The layer's output minus its base layer's is scale * B A x: alpha/r for LoRA, alpha/sqrt(r) for rsLoRA."""
    model = build(tiny, quant=NONE, lora=lora(r=16, use_rslora=use_rslora))
    layer = first_q_proj(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(0)
    with torch.no_grad():
        b.copy_(torch.randn_like(b))
        x = torch.randn(3, a.shape[1])
        update = layer(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(update, scale * x @ a.T @ b.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", [NONE, NF4])
def test_dora_starts_as_the_base_and_trains_a_magnitude_per_output_row(tiny, quant):
    model = build(tiny, quant=quant, lora=lora(use_dora=True))
    ids = batch(1)
    with model.disable_adapter():
        base = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5)  # B = 0, magnitude = |W| by row

    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 * len(TARGETS)  # every target of both layers
    assert all(p.requires_grad and p.dim() == 1 for p in magnitudes.values())
    q = first_q_proj(model)
    assert magnitudes[next(n for n in magnitudes if "layers.0.self_attn.q_proj" in n)].numel() == q.out_features

    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes.values())


@pytest.mark.parametrize("quant", [NONE, NF4])
def test_dora_adapter_reloads_and_exports_to_the_same_logits(tiny, tmp_path, quant):
    """Save, reload onto a fresh base (the reload tests' tolerance, 1e-6), and the merged export against the
    adapter computing in float32 (test_export's 1e-4: summation order only)."""
    model = trained(tiny, quant, "new_rows", lora=lora(use_dora=True, use_rslora=True))
    ids = batch(5)
    expected = logits(model, ids)
    run = tmp_path / "run"
    save_adapter(model, tiny.tokenizer, run / "adapter", rows=tiny.rows)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True and adapter_config["use_rslora"] is True

    torch.manual_seed(99)
    reloaded, _ = load_adapter(run / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-6)

    merged = AutoModelForCausalLM.from_pretrained(str(export(run, tmp_path / "merged"))).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    set_compute_dtype(reloaded, torch.float32)  # 4-bit layers: the export's arithmetic (a no-op without them)
    torch.testing.assert_close(logits(merged, ids), logits(reloaded, ids), rtol=1e-4, atol=1e-4)


def test_all_linear_is_every_projection_but_the_head(tiny):
    llama = build(tiny, quant=NF4, lora=LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in llama.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(TARGETS)  # the Llama block: its 4-bit projections, the default list's seven

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    targets = set(lora_config(gpt2, LoraConfig(target_modules="all-linear"), []).target_modules)
    assert targets == {"c_attn", "c_proj", "c_fc"}  # GPT-2's Conv1D projections; lm_head is not a target


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.target_modules=everything", "lora.target_modules='everything': expected a list of module names"),
        ("lora.target_modules=[]", r"lora.target_modules=\[\]: expected at least one module name"),
    ],
)
def test_bad_targets_are_refused_with_the_key(make_config, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_config([override], tmp_path))


def test_the_planner_plans_all_linear_and_refuses_dora(make_config, tmp_path):
    default = setup_from_config(make_config([], tmp_path))
    assert setup_from_config(make_config(["lora.target_modules=all-linear"], tmp_path)).targets == default.targets
    with pytest.raises(ConfigError, match="lora.use_dora=true: the planner models LoRA and full fine-tuning only"):
        setup_from_config(make_config(["lora.use_dora=true"], tmp_path))


@pytest.mark.slow
def test_dora_rslora_all_linear_run_end_to_end_with_tensorboard(tmp_path):
    """The pipeline with every variant at once, logging to TensorBoard beside the CSV curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    variants = ["lora.use_dora=true", "lora.use_rslora=true", "lora.target_modules=all-linear", "logger=tensorboard"]
    proc = run_py(SMOKE[:1] + variants + [f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["final/tc_bpc"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and set(config["target_modules"]) == set(TARGETS)

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/tc_bpc"} <= scalars, scalars
    val = [e.value for e in events.Scalars("val/tc_bpc")]
    assert val and all(math.isfinite(v) for v in val)
    assert (out / "csv" / "metrics.csv").is_file()  # the dashboard's curve is still written
    assert (out / "tensorboard" / "hparams.yaml").is_file()


def test_dora_magnitudes_train_at_lr_without_weight_decay(tiny):
    """As _param_groups says: decay would pull them toward zero, not toward the row norms they start at."""
    from bailong.train.pretrain import _param_groups

    model = build(tiny, quant=NONE, lora=lora(use_dora=True))
    groups = {g["name"]: g for g in _param_groups(model, lr=1e-4, embedding_lr=1e-3, weight_decay=0.1)}
    magnitudes = {id(p) for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert {id(p) for p in groups["dora_magnitudes"]["params"]} == magnitudes
    assert (groups["dora_magnitudes"]["lr"], groups["dora_magnitudes"]["weight_decay"]) == (1e-4, 0.0)
    assert groups["lora"]["weight_decay"] == 0.1 and not magnitudes & {id(p) for p in groups["lora"]["params"]}
