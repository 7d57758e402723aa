"""Lightning callbacks: training throughput, a stop on a non-finite or blown-up loss (saving the state from before
the damage), and a fault injector for resume tests."""

from __future__ import annotations

import copy
import logging
import math
import os
import shlex
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from bailong.train.loggers import checkpoint_step

log = logging.getLogger(__name__)


class TokensPerSecond(pl.Callback):
    """Logs ``train/tokens_per_sec`` (tokens in optimizer steps / wall time, validation excluded) and
    ``train/elapsed_s`` (that wall time so far: the x axis of learning curves against compute)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        self.seconds += time.perf_counter() - self._t0
        self.tokens += int(batch["input_ids"].numel())
        self._t0 = None
        if self.seconds > 0:
            pl_module.log("train/tokens_per_sec", self.tokens / self.seconds, on_step=True, prog_bar=True)
            pl_module.log("train/elapsed_s", self.seconds, on_step=True)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class NonFiniteGuard(pl.Callback):
    """Stop a run whose loss, gradients or parameters go non-finite or whose loss blows up, and save the newest
    state known to be good to ``<dirpath>/last_good.ckpt``, with the command that resumes from it.

    What stops the run, each found before the optimizer applies the step: a non-finite loss
    (``PretrainModule.training_step`` raises ``FloatingPointError``; checked here too, in ``on_before_backward``); a
    blown-up loss (``loss_limit``); a non-finite trainable gradient, or a non-finite trainable parameter
    (``on_before_optimizer_step``).

    Which state is good: the parameters of step k are what the update of step k-1 made, so a bad loss at step k
    means that update may already have done the damage (``train.lr=1e20``: finite parameters of 1e20, then NaN).
    The good state is therefore the newest one whose *own* loss passed: at the start of each step the guard copies
    the whole resumable state (trainable parameters, optimizer and scheduler state, loop counters, RNG: what a
    Lightning checkpoint holds) to CPU memory, and that copy becomes the good state once every loss of the step has
    passed and its parameters are all finite. So on a bad loss at step k ``last_good.ckpt`` holds step k-1 (step k's
    parameters may be the damage); on a non-finite gradient at step k it holds step k (its loss passed; the bad
    gradient was never applied). Cost: one CPU copy of the trainable parameters and optimizer state per optimizer
    step, two kept in memory (the mini default: 53 MB each, 16 ms of a 1.3 s step; 7B QLoRA with 8k new rows:
    about 1.2 GB each).

    Under FSDP (and other sharding strategies) no copy is kept: it would gather every shard each step. There the
    guard saves nothing and names the newest periodic checkpoint whose step's loss it saw pass, if there is one.
    When the run's first step already fails, no state has passed and nothing is saved. Under 16-mixed precision
    non-finite gradients are left to the GradScaler (it skips such a step and lowers its scale).

    ``loss_limit`` (the blown-up rule): with ``L0`` the loss of the run's first step (kept in checkpoints, so a
    resumed run keeps its start) and ``V`` the vocabulary size, a loss above ``L0 + max(min_rise, (ln V - L0) / 2)``
    nats has climbed more than halfway from where training started to uniform guessing over the vocabulary
    (``ln V``), and at least ``min_rise`` nats. Healthy runs stay far below it (the mini default: the limit is
    about 2.2 nats above the start, while the loss moves within ~1 nat of it). It is a rule on single batches,
    though: on the byte-level mini base the limit is only 1.6 nats above a first batch that happened to be easy,
    and three of its init ablation's weaker starts (subword_mean, multivariate) crossed it during warm-up although
    they then trained as their other seeds did (experiments/README.md; rerun with
    ``+callbacks.nonfinite_guard.min_rise=2.5``). A model collapsed to a uniform
    distribution (``lr=1e6``: loss = ln V) or climbing the gradient (``lr<0``) crosses it. A random base starts
    at ``L0`` ~ ln V, where the limit is ``L0 + min_rise``. Without a known ``V`` the limit is
    ``L0 + max(min_rise, L0)`` (a doubled loss).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str = "last_good.ckpt",
        min_rise: float = 1.0,
        keep_state: bool = True,
    ) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.min_rise = min_rise
        self.keep_state = keep_state
        self.saved_path: Path | None = None
        self.first_loss: float | None = None  # L0 of the rule; in the checkpoint via state_dict
        self.vocab_size: int | None = None
        self._good: dict | None = None  # the resumable state of the newest step whose losses all passed
        self._pending: dict | None = None  # the state at the start of the current step, not yet passed
        self._pending_step: int | None = None
        self._passed_step: int | None = None  # the newest step whose losses passed (with or without a copy)
        self._copying = keep_state  # decided per strategy in setup
        self._stopped = False

    # -- state kept in Lightning checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first_loss = state_dict.get("first_loss")

    # -- the checks -------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.vocab_size = vocab_size(pl_module)
        # a copy per step would gather every shard under FSDP (a collective, and the whole model): keep none there
        self._copying = self.keep_state and trainer.is_global_zero and not _shards_state(trainer.strategy)

    def loss_limit(self) -> float | None:
        """The blown-up line in nats (see the class docstring); None before the first loss is known."""
        if self.first_loss is None:
            return None
        first = self.first_loss
        if self.vocab_size:
            return first + max(self.min_rise, (math.log(self.vocab_size) - first) / 2)
        return first + max(self.min_rise, first)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the first micro-batch of an optimizer step: copy the state that step starts from
        if self._copying and trainer.global_step != self._pending_step:
            self._pending = cpu_copy(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
            self._pending_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        value = float(loss.detach()) * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        scaler = grad_scaler(trainer)
        if scaler is not None:  # 16-mixed: the hook sees the loss times the GradScaler's scale
            value /= scaler.get_scale()
        step = trainer.global_step
        if not math.isfinite(value):
            raise FloatingPointError(
                f"non-finite training loss ({value}) at step {step}; lower train.lr or check the data"
            )
        if self.first_loss is None:
            self.first_loss = value
        limit = self.loss_limit()
        if value > limit:
            uniform = (
                f"uniform guessing over {self.vocab_size} tokens (ln {self.vocab_size} = "
                f"{math.log(self.vocab_size):.2f})"
                if self.vocab_size
                else "twice that"
            )
            raise FloatingPointError(
                f"training loss {value:.4g} at step {step} has blown up: above {limit:.4g} nats, more than halfway "
                f"from the first step's loss {self.first_loss:.4g} to {uniform}; lower train.lr or check the data"
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        # every loss of this step has passed: its starting state is good, if its parameters are all finite
        if self._pending is not None and self._pending_step == step:
            bad = non_finite_names(self._pending["state_dict"].items())
            if bad:
                raise FloatingPointError(
                    f"non-finite parameter at step {step} in {len(bad)} tensor(s), e.g. "
                    f"{bad[0]}; lower train.lr or check the data"
                )
            self._good, self._pending = self._pending, None
        self._passed_step = step
        if grad_scaler(trainer) is not None:  # 16-mixed: an overflowing gradient is normal; the scaler skips the step
            return
        bad = non_finite_names((n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None)
        if bad:
            raise FloatingPointError(
                f"non-finite gradient at step {step} in {len(bad)} parameter(s), e.g. {bad[0]}; "
                "lower train.lr or check the data"
            )

    # -- the stop -----------------------------------------------------------------------------------------------
    def _path(self, trainer: pl.Trainer) -> Path:
        dirpath = self.dirpath or (trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, FloatingPointError) or self._stopped or not trainer.is_global_zero:
            return  # rank 0 keeps the copy and writes; the other ranks' errors travel as they are
        self._stopped = True
        hp = getattr(pl_module, "hp", {})
        if self._good is not None:
            path = self._path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.save_checkpoint(self._good, path)  # rank 0 writes; no barrier: a rank may be stuck
            self.saved_path = path
            note = (
                f"training stopped at step {trainer.global_step}; {path} holds step {self._good['global_step']}, "
                f"the newest state whose loss passed the checks. {resume_advice(path, trainer, hp)}"
            )
        elif (periodic := self._passed_periodic_checkpoint(trainer)) is not None:
            note = (
                f"training stopped at step {trainer.global_step}; no state was kept in memory here, but "
                f"{periodic} is from a step whose loss passed the checks. {resume_advice(periodic, trainer, hp)}"
            )
        else:
            note = (
                f"training stopped at step {trainer.global_step}; no state before it passed the checks, so "
                "nothing was saved: start over with a lower train.lr, or check the data"
            )
        exception.add_note(note)
        log.error("%s\n%s", exception, note)

    def _passed_periodic_checkpoint(self, trainer) -> Path | None:
        """The checkpoint callback's newest file, if its step's loss passed (its step <= ``_passed_step``)."""
        callback = trainer.checkpoint_callback
        candidate = callback and (callback.last_model_path or callback.best_model_path)
        if not candidate or self._passed_step is None or not Path(candidate).is_file():
            return None
        try:
            step = checkpoint_step(candidate)
        except Exception:  # noqa: BLE001  damaged: not a state to resume from
            return None
        return Path(candidate) if step <= self._passed_step else None


def non_finite_names(named_tensors) -> list[str]:
    """The names of the floating-point tensors among ``(name, tensor)`` pairs that hold a NaN or an infinity.

    One ``abs().amax()`` per tensor (NaN and infinity survive it) and one host sync per device: about 5x faster
    than ``isfinite(t).all()`` per tensor on the CPU, which matters once per step."""
    named = [(n, t.detach()) for n, t in named_tensors if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for indices in by_device.values():
        peaks = torch.stack([named[i][1].abs().amax().float() for i in indices])
        bad += [indices[j] for j in (~torch.isfinite(peaks)).nonzero().flatten().tolist()]
    return [named[i][0] for i in sorted(bad)]


def grad_scaler(trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of a 16-mixed run, if one is active."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def vocab_size(pl_module) -> int | None:
    """The number of tokens the model predicts among (padding rows excluded), if the module says."""
    model = getattr(pl_module, "model", None)
    build = getattr(model, "bailong_build", None) or {}
    if build.get("vocab_size"):
        return int(build["vocab_size"])
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def _shards_state(strategy) -> bool:
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    return not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))


def cpu_copy(obj):
    """A deep copy of a checkpoint dict with every tensor detached and copied to the CPU (later in-place updates
    of the live parameters and optimizer state do not reach it)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def resume_advice(ckpt: Path, trainer, hp: dict) -> str:
    """The command that resumes this run from ``ckpt`` with a tenth of its learning rates (``hp``: the module's
    ``lr`` and ``embedding_lr``): the run's own overrides (from Hydra, when it started the run) with ckpt_path,
    hydra.run.dir and the learning rates replaced."""
    lowered = {"train.lr": f"{hp['lr'] / 10:g}" if hp.get("lr") else "<lower>"}
    if hp.get("embedding_lr"):
        lowered["train.embedding_lr"] = f"{hp['embedding_lr'] / 10:g}"
    replaced = {"ckpt_path", "hydra.run.dir", "train.lr", "train.embedding_lr"}
    overrides, out = [], Path(trainer.default_root_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        # Hydra's overrides are this run's only if Hydra made this run's directory
        if hydra is not None and Path(hydra.runtime.output_dir).resolve() == out.resolve():
            overrides = [o for o in hydra.overrides.task if o.lstrip("+~").split("=", 1)[0] not in replaced]
    except Exception:  # noqa: BLE001  no Hydra run: the bare command
        pass
    args = [*overrides, f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *(f"{k}={v}" for k, v in lowered.items())]
    return (
        "Resume from it with lower learning rates (they replace the checkpoint's):\n"
        f"  python run.py {' '.join(shlex.quote(a) for a in args)}"
    )


class KillAtStep(pl.Callback):
    """Test fault injection: SIGKILL this process once ``global_step`` reaches ``step``.

    Runs after the checkpoint callbacks of that step (it is placed last), so a resume test sees
    exactly what a real crash would leave behind.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class GatherFullState(pl.Callback):
    """FSDP: the trainable parameters' whole values, gathered from every rank's shard onto rank 0's CPU when
    training ends, before Lightning's teardown moves the sharded module off the GPU (the pipeline adds
    this callback itself under ``FSDPStrategy``; every rank takes part in the gather).

    ``state`` maps the names of the unwrapped model (``model.named_parameters()`` of the LightningModule's
    ``model``) to tensors; only rank 0 holds it.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # offload only from a GPU: on the CPU "offloading" is no copy and rank0_only then leaves the other
        # ranks with freed memory (see bailong.train.strategies)
        on_gpu = trainer.strategy.root_device.type == "cuda"
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=on_gpu, offload_to_cpu=on_gpu):
            if trainer.is_global_zero:
                self.state = {
                    unwrapped_name(n): p.detach().cpu().clone()
                    for n, p in pl_module.model.named_parameters()
                    if p.requires_grad
                }

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the gathered values into ``model`` (built as the trained one was); every one must land."""
        if self.state is None:
            raise RuntimeError("GatherFullState has no state: training did not end on this rank (rank 0 only)")
        params = dict(model.named_parameters())
        missing = sorted(set(self.state) - set(params))
        if missing:
            raise RuntimeError(f"gathered FSDP parameters not in the rebuilt model: {missing[:5]}")
        with torch.no_grad():
            for name, value in self.state.items():
                if params[name].shape != value.shape:
                    raise RuntimeError(f"{name}: gathered shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(value)


def unwrapped_name(name: str) -> str:
    """A parameter's name without the ``_fsdp_wrapped_module.`` segments FSDP's wrappers add."""
    return name.replace("_fsdp_wrapped_module.", "")
