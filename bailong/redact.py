"""Keep secrets out of everything a run writes: logs, saved configs, logger hyper-parameters.

API keys are read from the environment (``WANDB_API_KEY``, ``judge.api_key_env``, hub tokens) and never
belong in a config. But a config can still pick one up (``${oc.env:WANDB_API_KEY}`` in an override, a
key pasted as a value), and the resolved config is written to disk and sent to W&B. ``redact`` replaces
every value that contains a secret from the environment, and every value under a key named like a
secret, with ``REDACTED``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"
SECRET_ENV_VARS = ("WANDB_API_KEY", "JUDGE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|auth_token|access_token|hf_token)$", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact ordinary settings


def secrets_from_env(extra_vars: Iterable[str] = ()) -> list[str]:
    """The values of the secret environment variables that are set (plus ``extra_vars``, e.g. the judge's)."""
    names = dict.fromkeys([*SECRET_ENV_VARS, *(v for v in extra_vars if v)])
    return [v for v in (os.environ.get(n) for n in names) if v and len(v) >= MIN_SECRET_LEN]


def redact(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of a plain container (dicts, lists, scalars) with secret values replaced by ``REDACTED``."""
    secrets = list(secrets_from_env() if secrets is None else secrets)
    if isinstance(obj, Mapping):
        return {k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and obj[k] not in (None, "")
                else redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    return obj
