"""Device placement follows trainer.accelerator; cached artefacts are computed once while others wait;
a padded vocabulary changes no number."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from bailong.model.config import LoraConfig, QuantConfig
from conftest import ROOT, base_config, compose_config


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_run_device_is_the_cpu_without_a_gpu(monkeypatch, accelerator):
    from bailong.model.device import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_device(accelerator) == torch.device("cpu")


def test_run_device_is_this_ranks_gpu(monkeypatch):
    from bailong.model.device import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run_device("gpu") == torch.device("cuda", 3)
    assert run_device("auto") == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "1")  # srun starts every rank itself
    assert run_device("cuda") == torch.device("cuda", 1)


def test_run_device_refuses_a_missing_gpu_and_unknown_names(monkeypatch):
    from bailong.model.device import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="trainer.accelerator='gpu'.*no CUDA device"):
        run_device("gpu")
    with pytest.raises(ValueError, match="trainer.accelerator='tpu'.*expected one of"):
        run_device("tpu")


class _InitReached(Exception):
    def __init__(self, device: torch.device):
        self.device = device


def test_init_strategy_and_its_corpus_pass_get_the_base_on_the_configured_device(monkeypatch, tmp_path):
    """The init strategy (zip_tie: its corpus pass runs the base over the TC text wherever the base is) gets
    the base on the device the run trains on. The run's device is made the meta device (weights without
    values, so nothing computes): the old code, which loaded the base without a device, handed it a CPU
    model and fails this test."""
    from bailong.data.splits import load_splits
    from bailong.stages import common as pipeline

    cfg = compose_config(
        ["experiment=smoke", "init=zip_tie", f"paths.cache_dir={tmp_path}"], output_dir=tmp_path / "run"
    )
    splits = load_splits(OmegaConf.to_object(cfg.data))
    _, ext, base_tok, tok = pipeline.build_tokenizers(cfg, splits)
    asked = []

    def device_of_run(accelerator):
        asked.append(accelerator)
        return torch.device("meta")

    def spy(model, *args, **kwargs):
        raise _InitReached(next(model.parameters()).device)

    monkeypatch.setattr(pipeline, "run_device", device_of_run)
    monkeypatch.setattr(pipeline, "resize_and_initialize", spy)
    with pytest.raises(_InitReached) as reached:
        pipeline.initial_rows(cfg, base_tok, tok, ext.cache_key, splits)
    assert asked == [cfg.trainer.accelerator]
    assert reached.value.device.type == "meta"
    assert not list((tmp_path / "init_rows").glob("*/rows.safetensors"))  # a failed init caches nothing


def test_cached_result_is_computed_once_while_the_others_wait(tmp_path):
    """Four concurrent callers of one cache entry (DDP ranks, sweep jobs): one computes, all get its result."""
    from bailong.cache import cached_json

    calls = []

    def compute():
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough that the other callers arrive while it runs
        return {"value": len(calls)}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_json(tmp_path, {"k": 1}, compute))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [{"value": 1}] * 4


# -- vocabulary padding -------------------------------------------------------------------------------
def _build(pad: int, **kwargs):
    from bailong.model.build import build_model

    torch.manual_seed(0)
    rows = {"embed": torch.randn(37, 256) * 0.02, "head": torch.randn(37, 256) * 0.02}
    return build_model(
        base_config(str(ROOT / "models" / "mini-base"), pad_vocab_to_multiple_of=pad),
        vocab_size=5037,
        num_base=5000,
        rows=rows,
        quant=QuantConfig(name="none"),
        lora=LoraConfig(r=4, dropout=0.0),
        **kwargs,
    )


def test_padded_vocabulary_gives_the_same_loss_gradients_and_scores():
    """5,037 rows padded to 5,056: the padding rows are zero, never take probability, get no gradient; the
    training loss and its gradients are bit-identical to the unpadded model's, its log-probabilities (a matmul
    of another shape) within 1e-5."""
    from bailong.train.loss import causal_lm_loss

    plain, padded = _build(1), _build(64)
    assert plain.get_input_embeddings().weight.shape[0] == 5037
    assert padded.get_input_embeddings().weight.shape[0] == padded.bailong_build["padded_vocab_size"] == 5056
    assert padded.get_base_model().get_output_embeddings().weight[5037:].abs().sum() == 0
    ids = torch.randint(0, 5037, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, padded):
        model.zero_grad()
        loss = causal_lm_loss(model, ids, ids)
        loss.backward()
        losses.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(losses[0][0], losses[1][0])  # the fused loss slices the padding off: the same matmuls
    assert losses[0][1].keys() == losses[1][1].keys()
    for name, grad in losses[0][1].items():
        assert torch.equal(losses[1][1][name], grad), name
    with torch.no_grad():
        logp_plain = torch.log_softmax(plain(input_ids=ids).logits.float(), -1)
        logits_padded = padded(input_ids=ids).logits.float()
    assert logits_padded.shape[-1] == 5056 and torch.isneginf(logits_padded[..., 5037:]).all()
    torch.testing.assert_close(torch.log_softmax(logits_padded, -1)[..., :5037], logp_plain, rtol=1e-5, atol=1e-5)


def test_padding_rows_are_never_sampled():
    from bailong.model.adapter import _base_weight

    model = _build(64).eval()
    with torch.no_grad():  # make the padding rows by far the likeliest tokens, were they ever scored
        _base_weight(model, model.get_base_model().get_output_embeddings())[5037:] = 1.0
    prompt = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        assert torch.isneginf(model(input_ids=prompt).logits[..., 5037:]).all()
        torch.manual_seed(0)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=2,
        )
    assert int(out.max()) < 5037


def test_padding_must_be_a_positive_integer():
    from bailong.model.build import padded_size

    assert padded_size(59241, 64) == 59264 and padded_size(59264, 64) == 59264 and padded_size(5, 1) == 5
    with pytest.raises(ValueError, match="model.pad_vocab_to_multiple_of=0"):
        padded_size(100, 0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.attn_implementation=flash", "model.attn_implementation='flash': expected one of sdpa, eager"),
        ("model.pad_vocab_to_multiple_of=0", "model.pad_vocab_to_multiple_of=0: expected a positive integer"),
    ],
)
def test_speed_switches_are_checked_before_anything_loads(tmp_path, override, message):
    from bailong.checks import ConfigError, check_config

    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(["experiment=smoke", override], tmp_path))


def test_flash_attention_is_refused_where_it_cannot_run(tmp_path):
    from bailong.checks import speed_switch_problems

    problems = speed_switch_problems(compose_config(["model.attn_implementation=flash_attention_2"], tmp_path))
    assert len(problems) == 1 and "flash_attention_2" in problems[0] and "use sdpa" in problems[0]
