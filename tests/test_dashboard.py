"""The dashboard on small sweeps written here in the pipeline's real file formats, and in headless chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from bailong.dashboard import build_dashboard
from bailong.dashboard.__main__ import main as dashboard_main
from bailong.dashboard.collect import DashboardInputError, collect_runs, parse_overrides
from bailong.dashboard.table import group_runs, swept_keys
from conftest import compose_config

CURVE_KEYS = ["epoch", "step", "train/loss", "train/elapsed_s", "val/tc_bpc", "val/en_bpc", "final/tc_bpc"]


def write_run(
    run_dir: Path,
    overrides: list[str],
    metrics: dict | None = None,
    error: dict | None = None,
    curve: list[tuple[int, float]] = (),
    seconds_per_step: float | None = None,
) -> Path:
    """A run directory as Hydra, the pipeline (metrics.json, csv/metrics.csv) and run.py (error.json) write it."""
    cfg = compose_config(overrides, output_dir=run_dir)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    choices = {"init": cfg.init.name, "tokenizer": cfg.tokenizer.name, "lora": "default", "hydra/launcher": "basic"}
    hydra = {"hydra": {"mode": "MULTIRUN", "runtime": {"choices": choices}}}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if error is not None:
        (run_dir / "error.json").write_text(json.dumps(error, indent=2))
    if curve:
        (run_dir / "csv").mkdir()
        with open(run_dir / "csv" / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, CURVE_KEYS)  # Lightning's CSVLogger: union of keys, empty cells
            writer.writeheader()
            for step, value in curve:
                row = {"epoch": 0, "step": step, "train/loss": 5.0 - step / 100}
                if seconds_per_step is not None:  # CSV step k: after k + 1 optimizer steps
                    row["train/elapsed_s"] = (step + 1) * seconds_per_step
                writer.writerow(row)
                writer.writerow({"step": step, "val/tc_bpc": value, "val/en_bpc": 1.8})
    return run_dir


def metrics_for(step0: float, final: float, **extra) -> dict:
    return {
        "init/strategy": "x",
        "base/tc_bpc": 7.4,
        "step0/tc_bpc": step0,
        "final/tc_bpc": final,
        "base/en_bpc": 1.80,
        "step0/en_bpc": 1.81,
        "final/en_bpc": 1.82,
        "tokenizer/added": 8000,
        "tokenizer/tc_tokens_per_char": 0.78,
        "params/trainable": 1_000_000,
        "train/tokens_per_sec": 900.0,
        "train/steps": 30,
        **extra,
    }


FINALS = {
    ("random", 1): 7.9,
    ("random", 2): 7.7,
    ("zip_tie", 1): 7.45,
    ("zip_tie", 2): 7.43,
    ("mean", 1): 8.0,
    ("mean", 2): 8.2,
}


@pytest.fixture(scope="module")
def init_sweep(tmp_path_factory) -> Path:
    """An init ablation: 3 strategies x 2 seeds, plus one failed and one still-running job."""
    sweep = tmp_path_factory.mktemp("sweep") / "ablation_init" / "multirun" / "2026-11-27_08-00-00"
    job = 0
    for (init, seed), final in FINALS.items():
        step0 = final + 0.6
        write_run(
            sweep / str(job),
            ["experiment=ablation_init", f"init={init}", f"seed={seed}"],
            metrics_for(step0, final),
            curve=[(9, step0 - 0.3), (19, final + 0.1), (29, final)],
        )
        job += 1
    write_run(
        sweep / str(job),
        ["experiment=ablation_init", "init=distill", "seed=1"],
        error={
            "status": "failed",
            "type": "OutOfMemoryError",
            "message": "CUDA out of memory (simulated)",
            "traceback": "Traceback ...\nOutOfMemoryError",
            "overrides": ["init=distill", "seed=1"],
        },
    )
    write_run(sweep / str(job + 1), ["experiment=ablation_init", "init=distill", "seed=2"])  # neither file yet
    return sweep


def test_groups_by_swept_values_with_mean_and_std_over_seeds(init_sweep):
    runs = collect_runs([init_sweep])
    assert [r.path.name for r in runs] == [str(i) for i in range(8)]  # job order, not string order
    assert swept_keys(runs) == ["init", "seed"]  # experiment= is the same everywhere: not swept
    groups = group_runs(runs)
    assert [g.values for g in groups] == [{"init": i} for i in ("random", "zip_tie", "mean", "distill")]
    by_init = {g.values["init"]: g for g in groups}
    stat = by_init["random"].stats["final/tc_bpc"]
    assert stat.n == 2 and stat.mean == pytest.approx(7.8) and stat.std == pytest.approx(statistics.stdev([7.9, 7.7]))
    distill = by_init["distill"]
    assert (distill.count("failed"), distill.count("incomplete"), distill.count("ok")) == (1, 1, 0)
    assert distill.stats == {}


def test_writes_markdown_csv_and_a_self_contained_page(init_sweep, tmp_path):
    dash = build_dashboard([init_sweep], tmp_path / "dash")
    md = (tmp_path / "dash" / "results.md").read_text()
    header, rule, *rows = md.strip().splitlines()
    assert header.startswith("| init | runs | final/tc_bpc | step0/tc_bpc |")
    assert len(rows) == 4 and rule.count("|") == header.count("|")
    zip_row = next(r for r in rows if r.startswith("| zip_tie"))
    assert "**7.440 ± 0.014**" in zip_row  # the best final/tc_bpc is bold
    assert "0 + 1 failed + 1 incomplete" in next(r for r in rows if r.startswith("| distill"))

    with open(tmp_path / "dash" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["init"] for r in table] == ["random", "zip_tie", "mean", "distill"]
    assert float(table[2]["final/tc_bpc mean"]) == pytest.approx(8.1)
    assert table[3]["runs_failed"] == "1" and table[3]["final/tc_bpc mean"] == ""

    html = dash.html.read_text()
    assert re.search(r"<(img|script|link)[^>]+(src|href)=\"(?!data:)", html) is None, "page must be self-contained"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2  # learning curves, step 0 vs final (no vocabulary or rank was swept)
    assert "OutOfMemoryError" in html and "CUDA out of memory (simulated)" in html
    assert "no metrics.json and no error.json" in html


def test_vocabulary_and_rank_figures_appear_when_swept(tmp_path):
    sweep = tmp_path / "sweep"
    for job, (vocab, r) in enumerate([(0, 8), (8000, 8), (16000, 64), (16000, 8)]):
        fertility = 1.2 - vocab / 40000
        write_run(
            sweep / str(job),
            [f"tokenizer.added_vocab={vocab}", f"lora.r={r}"],
            metrics_for(
                7.9,
                7.5,
                **{"tokenizer/added": vocab, "tokenizer/tc_tokens_per_char": fertility, "params/trainable": 4096 * r},
            ),
        )
    dash = build_dashboard([sweep])
    html = dash.html.read_text()
    assert "Added vocabulary" in html and "LoRA rank" in html
    assert [g.values for g in dash.groups][:2] == [
        {"tokenizer.added_vocab": 0, "lora.r": 8},
        {"tokenizer.added_vocab": 8000, "lora.r": 8},
    ]


def test_cli_reads_several_sweeps_and_rejects_a_directory_without_runs(init_sweep, tmp_path, capsys):
    other = write_run(tmp_path / "other" / "0", ["init=subword_mean", "seed=1"], metrics_for(8.5, 7.6)).parent
    assert dashboard_main([str(init_sweep), str(other), "--out", str(tmp_path / "both")]) == 0
    printed = capsys.readouterr().out
    assert "9 runs (1 failed) in 5 groups" in printed and "| subword_mean |" in printed
    (tmp_path / "empty").mkdir()
    assert dashboard_main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_bad_files_name_the_file():
    with pytest.raises(DashboardInputError, match="overrides.yaml: item 2"):
        parse_overrides(["init=mean", "oops"], Path("x/.hydra/overrides.yaml"))


def test_corrupt_metrics_json_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "0", ["init=mean"], metrics_for(8.0, 7.5))
    (run / "metrics.json").write_text('{"final/tc_bpc": 7.5,\n "step0/tc_bpc": }')
    with pytest.raises(DashboardInputError, match=r"metrics.json: line 2"):
        collect_runs([tmp_path])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium); the page is still checked as HTML above",
)
def test_page_renders_in_headless_chromium(init_sweep, tmp_path):
    """Load the page in a real browser: the DOM holds the table, and the screenshot is not blank."""
    from PIL import Image, ImageStat

    dash = build_dashboard([init_sweep], tmp_path / "dash")
    flags = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--no-sandbox",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = dash.html.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="results">' in dom.stdout and "zip_tie" in dom.stdout and "7.440 ± 0.014" in dom.stdout

    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    assert ImageStat.Stat(image).stddev[0] > 20, "screenshot is (nearly) blank"
    # the figures rendered: the band of the page where the first figure sits is not blank either
    figure_band = image.crop((100, 700, 1180, 1300))
    assert ImageStat.Stat(figure_band).stddev[0] > 20


def test_learning_curves_against_steps_tc_characters_and_training_time(tmp_path):
    """The vocabulary question's axes: at equal steps the extended tokenizer trains on more TC characters, so a
    curve against characters moves its points right; seconds come from train/elapsed_s, averaged over seeds."""
    from bailong.dashboard import plots

    sweep = tmp_path / "ablation_vocab" / "multirun" / "2026-12-03_08-00-00"
    for job, (added, seed, chars, seconds) in enumerate(
        [(0, 1, 400.0, 2.0), (0, 2, 400.0, 4.0), (8000, 1, 640.0, 3.0), (8000, 2, 640.0, 3.0)]
    ):
        write_run(
            sweep / str(job),
            ["experiment=ablation_vocab", f"tokenizer.added_vocab={added}", f"seed={seed}"],
            metrics_for(8.0, 7.5, **{"train/tc_chars_per_step": chars}),
            curve=[(9, 7.8), (19, 7.6), (29, 7.5)],
            seconds_per_step=seconds,
        )
    groups = group_runs(collect_runs([sweep]))
    expected = {
        "step": {0: [0, 10, 20, 30], 8000: [0, 10, 20, 30]},
        "tc_chars": {0: [0, 4000, 8000, 12000], 8000: [0, 6400, 12800, 19200]},
        "seconds": {0: [0, 30, 60, 90], 8000: [0, 30, 60, 90]},  # the added-0 seeds' 2 s and 4 s per step: mean 3
    }
    for x, by_added in expected.items():
        fig = plots.learning_curves(groups, x=x)
        lines = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines if line.get_label()[0] != "_"}
        assert fig.axes[0].get_xlabel() == plots.X_AXES[x]
        for added, xs in by_added.items():
            label = next(label for label in lines if f"={added}" in label and "base" not in label)
            assert lines[label] == pytest.approx(xs), (x, added)
    with pytest.raises(ValueError, match="x='tokens'"):
        plots.learning_curves(groups, x="tokens")


def load_init_table():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "init_table.py"
    spec = importlib.util.spec_from_file_location("init_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_init_table_reports_test_figures_and_the_dev_curve_per_strategy_over_seeds(tmp_path):
    """experiments/init_table.py: one row per strategy, mean ± std over seeds, a later sweep's run replacing an
    earlier one of the same (strategy, seed); the curve starts at step0/ and reads val/ at each CSV step + 1."""
    script = load_init_table()
    old, new = tmp_path / "old", tmp_path / "new"
    for (init, seed), final in FINALS.items():
        metrics = metrics_for(final + 0.6, final, **{"init/strategy": init, "final/test_tc_bpc": final + 1.0})
        write_run(
            old / f"{init}{seed}", [f"init={init}", f"seed={seed}"], metrics, curve=[(9, final + 0.3), (19, final)]
        )
    replaced = metrics_for(7.9, 7.2, **{"init/strategy": "mean", "final/test_tc_bpc": 8.2})
    write_run(new / "0", ["init=mean", "seed=2"], replaced, curve=[(9, 7.5), (19, 7.2)])
    runs = script.finished_runs([old, new])
    assert len(runs) == len(FINALS)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in script.table(runs).splitlines()[2:]}
    assert list(rows) == ["zip_tie", "mean", "random"]  # by mean final test TC bits/char (mean: 8.6, random 8.8)
    mean_test = [FINALS[("mean", 1)] + 1.0, 8.2]
    expected = f"{statistics.fmean(mean_test):.3f} ± {statistics.stdev(mean_test):.3f}"
    assert rows["mean"][1] == "2" and rows["mean"][4] == expected
    curve = script.curve_table(runs, "val/tc_bpc").splitlines()
    assert curve[2].split(" | ")[2:] == ["0", "10", "20 |"]
    zip_tie = [line for line in curve if line.startswith("| zip_tie |")][0].split(" | ")
    at_10 = [FINALS[("zip_tie", s)] + 0.3 for s in (1, 2)]
    assert zip_tie[3] == f"{statistics.fmean(at_10):.3f} ± {statistics.stdev(at_10):.3f}"
    at_0 = [FINALS[("zip_tie", s)] + 0.6 for s in (1, 2)]
    assert zip_tie[2] == f"{statistics.fmean(at_0):.3f} ± {statistics.stdev(at_0):.3f}"
    # another swept setting: one row per value of it
    rank = tmp_path / "rank"
    for i, (r, seed, final) in enumerate([(8, 1, 7.3), (8, 2, 7.5), (64, 1, 7.2)]):
        metrics = metrics_for(7.9, final, **{"init/strategy": "zip_tie", "final/test_tc_bpc": final})
        write_run(rank / str(i), [f"lora.r={r}", f"seed={seed}"], metrics)
    by_rank = script.table(script.finished_runs([rank], "lora.r"), "lora.r").splitlines()
    assert by_rank[0].startswith("| lora.r | seeds |")
    assert [line.split(" | ")[:2] for line in by_rank[2:]] == [["| 64", "1"], ["| 8", "2"]]
    assert by_rank[3].split(" | ")[4] == f"{statistics.fmean([7.3, 7.5]):.3f} ± {statistics.stdev([7.3, 7.5]):.3f}"
