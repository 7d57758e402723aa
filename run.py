"""bailong entry point: one Hydra config = one experiment (see conf/config.yaml).

    python run.py init=zip_tie lora.r=64                    # one run
    python run.py -m init=random,mean,subword_mean,zip_tie  # an ablation sweep
    python run.py experiment=ablation_init                  # a preset sweep (conf/experiment/ablation_*.yaml)

Returns ``cfg.sweep_metric`` (default ``final/tc_bpc``) for Hydra sweepers. A run that fails (an exception,
a sweep metric that is NaN or infinite, or missing in a multirun) leaves ``error.json`` in its run
directory. A single run then re-raises (non-zero exit); a multirun job returns ``cfg.failed_run_value``
instead, so the sweep goes on: Hydra's BasicSweeper would otherwise stop with an error after the batch, and
hydra-optuna-sweeper 1.3 stops at the first failure (its default ``max_failure_rate`` is 0) and crashes on
a NaN return.
"""

import gc
import logging
import math
import os
import traceback
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BAILONG_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import bailong.config  # noqa: E402,F401  (registers the structured-config schema)
from bailong.run_files import ERROR_FILE  # noqa: E402

log = logging.getLogger("bailong.run")


class SweepMetricError(RuntimeError):
    """The run finished but its sweep metric is missing or not a finite number (e.g. training diverged)."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from bailong.console import configure_console  # heavy imports after Hydra has validated the config

    configure_console()  # after Hydra's logging setup, before the pipeline loads the libraries it quiets
    from bailong.stages import run

    out = Path(cfg.paths.output_dir)
    (out / ERROR_FILE).unlink(missing_ok=True)  # a resumed run in the same directory starts clean
    try:
        return sweep_value(run(cfg), cfg.sweep_metric, required=is_multirun())
    except Exception as err:  # noqa: BLE001  every failure is recorded; only a multirun swallows it
        record_failure(out, err, cfg)
        if not is_multirun():
            raise
        log.error("run failed (%s: %s); recorded in %s; the sweep goes on", type(err).__name__, err, out / ERROR_FILE)
    release_memory()  # outside the except block: the traceback no longer holds the failed job's model
    return cfg.failed_run_value


def sweep_value(metrics: dict, key: str, required: bool = True) -> float | None:
    """``metrics[key]`` as a float. A NaN or infinite value fails the run; so does a missing key where a
    sweeper needs the number (``required``), else it is only a warning (e.g. a stage that skips evaluation)."""
    value = metrics.get(key)
    if value is None and not required:
        log.warning("sweep_metric=%r is not in metrics.json: nothing to return to a sweeper", key)
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise SweepMetricError(
            f"sweep_metric={key!r} is {value!r} in metrics.json; expected a finite number "
            f"(numeric keys: {', '.join(numeric)})"
        )
    return float(value)


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(out: Path, err: BaseException, cfg: DictConfig) -> None:
    """Write ``error.json`` (atomically, secrets redacted, readable like the run's other files) and close the
    job's W&B run, marked failed. A disk too full for the record leaves no partial file and says so in the log."""
    from bailong.files import write_json_atomically
    from bailong.redact import redact_text, run_secrets

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    overrides = list(hc.overrides.task) if hc else []
    secrets = run_secrets(cfg, overrides)
    record = {
        "status": "failed",
        "type": type(err).__name__,
        "message": redact_text(str(err), secrets),
        "traceback": redact_text("".join(traceback.format_exception(err)), secrets),
        "overrides": [redact_text(o, secrets) for o in overrides],
        "job_num": OmegaConf.select(hc, "job.num", default=None) if hc else None,
        "sweep_metric": cfg.sweep_metric,
        "returned": cfg.failed_run_value if is_multirun() else None,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        write_json_atomically(out / ERROR_FILE, record)
    except OSError as write_err:  # e.g. the disk is full: the failure itself must still be reported
        log.error(
            "could not write %s (%s: %s); the run failed with %s: %s",
            out / ERROR_FILE,
            type(write_err).__name__,
            write_err,
            record["type"],
            record["message"],
        )
    finish_wandb_run(exit_code=1)  # else the next job of the multirun would log into this W&B run


def finish_wandb_run(exit_code: int) -> None:
    import sys

    wandb = sys.modules.get("wandb")  # only if this job imported it
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)


def release_memory() -> None:
    """Free a failed job's model before the next job of the sweep, so one OOM does not cause the next."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
