"""Shared fixtures: real configs composed from conf/, a repo-root anchor, small real corpora."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BAILONG_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bailong.config import compose_config  # noqa: E402  composed as run.py does; tests import it from here


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture
def make_config():
    return compose_config
