"""Keep secrets out of everything a run writes: logs, saved configs, W&B tags and config, error records.

API keys are read from the environment (``WANDB_API_KEY``, ``judge.api_key_env``, hub tokens) and never
belong in a config. But a config can still pick one up (``+judge.api_key=sk-…`` on the command line,
``${oc.env:WANDB_API_KEY}`` in an override, a key pasted where a variable *name* belongs), and the config
and its overrides are written to disk, logged and sent to W&B. So secrets are redacted **by value**,
wherever the value turns up:

- ``run_secrets`` collects them: the secret environment variables that are set, every value under a key
  named like a secret (``api_key``, ``token``, …) in the config or its overrides, and any key-shaped value
  (``sk-…``, ``hf_…``) among the overrides.
- ``redact`` (containers: configs, hyper-parameters, tags) and ``redact_text`` (log lines, error
  messages, files) replace them; ``redact_text`` also hides the password of a URL (``http://user:KEY@host``).
- ``install_log_filter`` redacts every log record as it is made; ``RedactSecrets`` is the Hydra callback
  (``conf/config.yaml``, ``hydra.callbacks``) that installs it and rewrites Hydra's own ``.hydra/*.yaml``.
- ``check_env_var_name`` refuses a key-shaped value in a field that names an environment variable
  (``judge.api_key_env``), without repeating the value.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
SECRET_ENV_VARS = ("WANDB_API_KEY", "JUDGE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|(auth|access|api|hub|hf|bearer)_token)$", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact ordinary settings
# the published prefixes of API keys and access tokens (OpenAI, Anthropic, Hugging Face, GitHub, Slack,
# AWS, Google, W&B-style 40-hex keys) — a value shaped like one is treated as a secret wherever it appears
KEY_PREFIX = re.compile(r"^(sk-|sk_|pk-|rk-|hf_|ghp_|gho_|ghu_|ghs_|github_pat_|xox[abprs]-|AKIA|AIza|Bearer\s)")
KEY_SHAPED = re.compile(r"^[A-Za-z0-9_\-+=]{32,}$")  # a long token: no spaces, dots or path separators
ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@")
# a key in a URL's query string (Google's ?key=AIza…, ?api_key=…, ?access_token=…)
URL_QUERY_KEY = re.compile(
    r"(?P<name>[?&](?:api_?key|key|token|access_token|auth|sig|signature)=)[^&#\s]+", re.IGNORECASE
)


def looks_like_secret(value: Any) -> bool:
    """Whether ``value`` is shaped like an API key or token: a known prefix, or a long mixed letters-and-digits
    token (an environment variable's *name* is neither)."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_LEN:
        return False
    if KEY_PREFIX.match(value):
        return True
    return (
        bool(KEY_SHAPED.match(value))
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
        and not value.isupper()
    )  # ALL_CAPS_WITH_DIGITS_2 is a variable name


def check_env_var_name(key: str, value: Any) -> None:
    """``value`` of the config key ``key`` must name an environment variable; a key-shaped value (a key pasted
    where its variable's name belongs) is refused without repeating it."""
    if value is None or value == "":
        return
    if looks_like_secret(value) or not isinstance(value, str) or not ENV_VAR_NAME.match(value):
        shape = "looks like an API key itself" if looks_like_secret(value) else "is not a variable name"
        raise ValueError(
            f"{key} must name the environment variable that holds the key (e.g. {key}=JUDGE_API_KEY), "
            f"but its value {shape} ({len(str(value))} characters, not shown). Put the key in the "
            "environment: export JUDGE_API_KEY=…; a key in the config would be written to logs and "
            "outputs"
        )


def secrets_from_env(extra_vars: Iterable[str] = ()) -> list[str]:
    """The values of the secret environment variables that are set (plus ``extra_vars``, e.g. the judge's)."""
    names = dict.fromkeys([*SECRET_ENV_VARS, *(v for v in extra_vars if v and ENV_VAR_NAME.match(str(v)))])
    return [v for v in (os.environ.get(n) for n in names) if v and len(v) >= MIN_SECRET_LEN]


def secrets_in(obj: Any, key: str = "") -> list[str]:
    """Values under secret-named keys of a plain container, and strings with a key's prefix anywhere in it (not
    every long token: a commit hash in ``model.revision`` is no secret)."""
    if isinstance(obj, Mapping):
        return [s for k, v in obj.items() for s in secrets_in(v, str(k))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in secrets_in(v, key)]
    if (
        isinstance(obj, str)
        and len(obj) >= MIN_SECRET_LEN
        and (SECRET_KEY.search(key) or KEY_PREFIX.match(obj) or (key.endswith("_env") and looks_like_secret(obj)))
    ):
        return [obj]
    return []


def secrets_in_overrides(overrides: Iterable[str]) -> list[str]:
    """Secret values among command-line overrides (``+judge.api_key=sk-…``, ``judge.api_key_env=sk-…``)."""
    found = []
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        value = value.strip("'\"")
        name = key.rsplit(".", 1)[-1]
        misplaced = name.endswith("_env") and (looks_like_secret(value) or not ENV_VAR_NAME.match(value))
        if len(value) >= MIN_SECRET_LEN and (SECRET_KEY.search(name) or KEY_PREFIX.match(value) or misplaced):
            found.append(value)
    return found


def run_secrets(cfg: Any = None, overrides: Iterable[str] = ()) -> list[str]:
    """Every secret value a run may hold: environment keys (the judge's variable included), secret-named or
    key-shaped values in ``cfg`` (an OmegaConf node or plain container) and in ``overrides``; longest first,
    so a key that contains another is replaced whole."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    plain = cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001  an unresolvable interpolation: take the values as written
            plain = OmegaConf.to_container(cfg, resolve=False)
    judge_env = plain.get("judge", {}).get("api_key_env") if isinstance(plain, Mapping) else None
    found = [
        *secrets_from_env([judge_env] if isinstance(judge_env, str) else []),
        *secrets_in(plain or {}),
        *secrets_in_overrides(overrides),
    ]
    return sorted(set(found), key=len, reverse=True)


def redact(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of a plain container (dicts, lists, scalars): values under secret-named keys, and strings that
    contain a secret value, become ``REDACTED``."""
    secrets = list(secrets_from_env() if secrets is None else secrets)
    if isinstance(obj, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and SECRET_KEY.search(k) and isinstance(obj[k], str) and obj[k]
            else redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str) and (
        any(s in obj for s in secrets) or URL_PASSWORD.search(obj) or URL_QUERY_KEY.search(obj)
    ):
        return REDACTED
    return obj


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret value, the password of every ``scheme://user:password@`` URL and the value of every
    key-named query parameter (``?key=…``) replaced."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return URL_QUERY_KEY.sub(lambda m: f"{m['name']}{REDACTED}", text)


def redact_record(record: logging.LogRecord, secrets: Iterable[str]) -> None:
    """Rewrite a log record in place: its message (arguments merged in) and its traceback text redacted."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001  a malformed record: leave it to the handler's own error path
        return
    redacted = redact_text(message, secrets)
    if redacted != message:
        record.msg, record.args = redacted, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text, secrets)


class SecretFilter(logging.Filter):
    """A logger or handler filter that redacts each record (in place, so every handler after it sees the
    redacted text too)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self.secrets)
        return True


def install_log_filter(secrets: Iterable[str]) -> None:
    """Redact ``secrets`` (and URL passwords) from every log record made from now on, whichever logger makes it.

    Done in the log record factory rather than on handlers: Hydra's launcher reconfigures logging (new
    handlers) and then logs a sweep's overrides before any callback could filter the new handlers. A second
    call replaces the secrets; it does not stack factories."""
    secrets = list(secrets)
    current = logging.getLogRecordFactory()
    base = getattr(current, "bailong_base", current)

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        redact_record(record, secrets)
        return record

    redacting_factory.bailong_base = base
    logging.setLogRecordFactory(redacting_factory)


def redact_files(paths: Iterable[Path], secrets: Iterable[str]) -> None:
    """Rewrite each existing file with its secrets redacted (atomically; files without one are left alone)."""
    secrets = list(secrets)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        clean = redact_text(text, secrets)
        if clean != text:
            tmp = path.with_name(path.name + ".redacting")
            tmp.write_text(clean, encoding="utf-8")
            tmp.replace(path)


def scrub_argv(secrets: Iterable[str]) -> None:
    """Redact the secrets in ``sys.argv`` (W&B records the command line in its run metadata)."""
    secrets = list(secrets)
    sys.argv[:] = [redact_text(a, secrets) for a in sys.argv]


try:  # the Hydra callback; hydra is a dependency of the entry point, not of this module's helpers
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class RedactSecrets(_HydraCallback):
    """Hydra callback (``hydra.callbacks.redact_secrets`` in ``conf/config.yaml``).

    Hydra logs a multirun's overrides and writes ``.hydra/{config,hydra,overrides}.yaml`` (and a sweep's
    ``multirun.yaml``) before the task function runs; this callback runs right after each of those and before
    the task: it filters every log handler, rewrites those files and ``sys.argv`` with the run's secrets redacted.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._filter(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._filter(config)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        secrets = self._filter(config)
        hydra = config.hydra
        from hydra.types import RunMode

        files = [Path(hydra.sweep.dir) / "multirun.yaml"] if hydra.mode == RunMode.MULTIRUN else []
        if hydra.output_subdir is not None:
            out = Path(hydra.runtime.output_dir) / str(hydra.output_subdir)
            files += [out / "config.yaml", out / "hydra.yaml", out / "overrides.yaml"]
        redact_files(files, secrets)
        scrub_argv(secrets)

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        # Hydra prints a failed job's overrides straight to stderr ("Error executing job with overrides: …")
        # after this callback, from job_return.overrides: redacted in place
        if job_return is not None and getattr(job_return, "overrides", None):
            secrets = self._filter(config)
            job_return.overrides[:] = [redact_text(str(o), secrets) for o in job_return.overrides]

    @staticmethod
    def _filter(config: Any) -> list[str]:
        from omegaconf import OmegaConf, open_dict

        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
        task = config.copy()
        with open_dict(task):
            task.pop("hydra", None)
        secrets = run_secrets(task, overrides)
        install_log_filter(secrets)
        return secrets
