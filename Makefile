# make run: set-up + the default pipeline (dvc repro) on the embedded dataset, CPU, no network.
# make test: set-up + ruff + pytest.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PYTHON ?= python3
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test lint bench plots-screenshot clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	dvc repro
	@cat results/report.md

test: setup
	ruff check .
	pytest -q

lint: setup
	ruff check .

bench: setup
	python bench/train_throughput.py
	python bench/chipnet_overhead.py
	python bench/chip_ci.py

clean-runs:
	rm -rf runs data/prepared .chipprune mlflow.db mlartifacts

# dvc plots show, then a headless-Chromium screenshot of the page (offline: network blocked)
plots-screenshot: setup
	dvc plots show --out dvc_plots
	tools/screenshot_plots.sh dvc_plots/index.html results/plots_screenshot.png 1400,2400
