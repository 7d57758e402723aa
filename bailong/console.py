"""What a run prints: each log line once, a training bar that counts steps, and no third-party noise.

``configure_console()`` runs once at the entry point (run.py), after Hydra has set up its logging (console and
``run.log``) and before the pipeline imports the libraries below. Every silenced message is named here, by
module and text, with the reason; nothing else is hidden.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

# (logger, message prefix, why): log records dropped by a filter on that logger only
SILENCED_LOG_MESSAGES = [
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional faster CPU kernel (the `kernels` package) is absent; the built-in CPU 4-bit path is used",
    ),
    (
        "lightning.pytorch.utilities.rank_zero",
        "💡 Tip:",
        "an advertisement for Lightning's hosted logger, printed by every Trainer",
    ),
]

# (category, message regex, module regex, why): warnings.filterwarnings entries
SILENCED_WARNINGS = [
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        "peft 0.21 reads the attribute transformers 5 renamed; nothing for a user to change",
    ),
    (
        FutureWarning,
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning 2.6 still builds torch's deprecated LeafSpec; nothing for a user to change",
    ),
]


def configure_console() -> None:
    """Quiet W&B's end-of-run panel, drop the known noise, and print each Lightning log line once."""
    # W&B's own switch (docs: "reduce log output"): no history/summary panel at the end, no offline
    # sync hint (the run summary gives it); an online run still prints its URL. WANDB_QUIET=false restores it.
    os.environ.setdefault("WANDB_QUIET", "true")
    for logger_name, prefix, _why in SILENCED_LOG_MESSAGES:
        add_filter_once(logging.getLogger(logger_name), DropMessagesStartingWith(prefix))
    for category, message, module, _why in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    route_lightning_logs_to_root()


class DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DropMessagesStartingWith) and other.prefix == self.prefix

    def __hash__(self) -> int:
        return hash(self.prefix)


def add_filter_once(logger: logging.Logger, log_filter: logging.Filter) -> None:
    if log_filter not in logger.filters:  # each job of a multirun calls configure_console again
        logger.addFilter(log_filter)


def route_lightning_logs_to_root() -> None:
    """Lightning's import gives the ``lightning`` logger its own stderr handler ("INFO: ...") and lets records
    propagate to the root too, where Hydra's console and ``run.log`` handlers print them again: every line twice.
    Where the root has handlers, Lightning's own (plain stream handlers) are removed and its records go to the
    root only: once on the console, and still in run.log. Without root handlers (a plain script) they stay."""
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's; a FileHandler someone configured stays
                logger.removeHandler(handler)
        logger.propagate = True


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, labelled for a run bounded by steps: ``Epoch 0 (max_steps=100)``. Lightning
    labels it ``Epoch 0/<max_epochs - 1>``, i.e. ``Epoch 0/-2`` when max_epochs is -1 (stop at max_steps)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (max_steps={self.trainer.max_steps})"
        # as Lightning pads it: the bar does not jump when the "Validation" bar takes its place
        return f"{description:{len(self.validation_description)}}"


def progress_bar(enabled: bool = True) -> Callback:
    """The training bar for ``conf/callbacks/default.yaml``. Lightning refuses a progress-bar callback beside
    ``trainer.enable_progress_bar=false`` (the smoke and sweep presets), so then a callback that does nothing.
    Without ``rich`` (not a bailong dependency) Lightning's tqdm bar, which reads ``Epoch 0``."""
    if not enabled:
        return Callback()
    return StepProgressBar() if importlib.util.find_spec("rich") else TQDMProgressBar()
