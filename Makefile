# Two commands on a fresh machine: `make run` (the embedded default experiment) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint install clean bench gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# Exact tested versions from constraints.txt (torch==2.13.0: the CPU wheel where it lies on disk, cp311 here);
# pyproject.toml holds ranges only, so `pip install -e .` into a CUDA environment keeps its torch.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# ruff (the version pinned in constraints.txt, settings in pyproject.toml): lint, then check the formatting.
# `$(VENV)/bin/ruff format .` applies the formatting; .pre-commit-config.yaml runs the same on each commit.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Speed and memory against transformers Trainer + peft, init, tokenizer and prepare-stage speed (~55 min at one
# thread); JSON also in outputs/bench/
# One thread by default: on a shared machine more threads slow everyone (set BENCH_THREADS to change).
BENCH_THREADS ?= 1
bench: $(STAMP)
	mkdir -p outputs/bench
	for b in train_throughput init_speed tokenize_speed prepare_speed; do \
	  OMP_NUM_THREADS=$(BENCH_THREADS) MKL_NUM_THREADS=$(BENCH_THREADS) $(PY) benchmarks/$$b.py \
	    > outputs/bench/$$b.json || exit 1; cat outputs/bench/$$b.json; done

# The CUDA checks in one JSON, under 8 minutes on one GPU (docs/gpu.md). No install step: on a GPU machine run it
# with that machine's Python (`make gpu-check PY=python3`); `make gpu-check ARGS=--cpu-smoke` runs it on a CPU.
gpu-check:
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .cache outputs/*/ .pytest_cache
