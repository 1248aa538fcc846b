# make run: set-up (the project with its dev and peers extras) + the default pipeline (dvc
# repro) on the embedded dataset, CPU, no network.
# make test: set-up + ruff + the strict docs build + pytest. make docs: the docs site in .site/.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PYTHON ?= python3
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test lint docs bench peers plots-screenshot clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,peers]"
	touch $@

# stages fork from a warm server (no per-stage imports) and log to one MLflow server
run: setup
	python -m pipelines.stage_server -- python -m pipelines.mlflow_server -- dvc repro
	@cat results/report.txt
	@echo
	@echo "Full table: results/report.csv and results/report.md; Pareto plot: results/pareto.png"
	@echo "Charts:      dvc plots show   (writes dvc_plots/index.html, renders offline)"
	@echo "Runs:        mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1"
	@echo "Experiments: dvc exp show"
	@echo "Models:      registered in MLflow per dataset and model (runs/export/*/export.json);"
	@echo "             python -m pipelines.compare --experiment chipprune --promote flops-0.25"

# the files holding `timing` tests: collecting only these saves seconds (tests/conftest.py
# fails the run when a timing test lives anywhere else)
TIMING_TESTS := tests/test_latency_budget.py

test: setup
	ruff check .
	mkdocs build --strict --quiet
	pytest -q -n 2 --dist loadgroup --no-loadscope-reorder -m "not timing" --durations=25   # groups: tests/conftest.py
	pytest -q -m timing $(TIMING_TESTS)             # wall-clock assertions, on an otherwise idle machine

lint: setup
	ruff check .

docs: setup
	mkdocs build --strict --quiet

bench: setup
	python bench/train_throughput.py
	python bench/ddp_scaling.py
	python bench/chipnet_overhead.py
	python bench/chip_ci.py

# our methods beside Torch-Pruning's criteria: recipes/digits-peers.yaml as the DVC
# experiment digits-peers (params.yaml becomes the recipe; the old one is kept in .chipprune/)
peers: setup
	python -m pipelines.recipe recipes/digits-peers.yaml
	@cat results/report.txt

clean-runs:
	rm -rf runs data/prepared .chipprune mlflow.db mlartifacts

# dvc plots show, then a headless-Chromium screenshot of the page (offline: network blocked)
plots-screenshot: setup
	dvc plots show --out dvc_plots
	tools/screenshot_plots.sh dvc_plots/index.html results/plots_screenshot.png 1400,2400

# Prefect: one flow run of the pipeline; a local server + pool + deployments + worker.
PREFECT_PORT ?= 4200
serve serve-stop: export PREFECT_API_URL = http://127.0.0.1:$(PREFECT_PORT)/api

.PHONY: pipeline serve serve-stop mlflow-screenshot

pipeline: setup
	python -m pipelines.flows

serve: setup
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) --background
	@for i in $$(seq 90); do curl -fs $$PREFECT_API_URL/health > /dev/null && exit 0; sleep 1; done; \
	  echo "no Prefect server at $$PREFECT_API_URL"; exit 1
	prefect work-pool create chipprune-pool --type process --overwrite
	python -m pipelines.deployments deploy
	CHIPPRUNE_REPO=$(CURDIR) prefect worker start --pool chipprune-pool

serve-stop:
	prefect server stop

# the MLflow runs page (parent pipeline run, stage runs nested) as a PNG, headless Chromium
mlflow-screenshot: setup
	tools/mlflow_screenshot.sh sqlite:///$(CURDIR)/mlflow.db results/mlflow_runs.png chipprune
