"""bailong entry point: one Hydra config = one experiment (see conf/config.yaml).

    python run.py init=zip_tie lora.r=64                    # one run
    python run.py -m init=random,mean,subword_mean,zip_tie  # an ablation sweep
"""
import os
from pathlib import Path

os.environ.setdefault("BAILONG_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import bailong.config  # noqa: E402,F401  (registers the structured-config schema)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from bailong.pipeline import run  # heavy imports after Hydra has validated the config

    metrics = run(cfg)
    return metrics.get(cfg.sweep_metric)


if __name__ == "__main__":
    main()
