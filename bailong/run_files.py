"""The names of what a run writes in its directory (README, "What a run writes"): the one place they are spelled,
for the stages that write them and the tools that read them (dashboard, bench, summary, checks, run.py)."""

METRICS_FILE = "metrics.json"  # written last and atomically: present only for a finished run
ERROR_FILE = "error.json"  # why a run failed (run.py)
INIT_REPORT_FILE = "init_report.json"  # what the init strategy did to the new rows
TOKEN_REPORT_FILE = "token_report.json"  # per appended token: training occurrences, how far its rows moved
ADAPTER_DIR = "adapter"  # the reloadable adapter (or whole model, for full fine-tuning)
TOKENIZER_DIR = "tokenizer"  # the extended tokenizer
CSV_METRICS = "csv/metrics.csv"  # the training curve (CSV logger)
