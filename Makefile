# One entry point for people and CI. `make run` = the whole pipeline on the embedded default;
# `make test` = the test suite. Both install what they need first (fast when already installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every tool runs in the project's quiet environment (no telemetry, no version checks: this
# machine has no internet and nothing may hang on it). It is defined once, in pipeline/env.py.
QUIET = $(PY) pipeline/env.py

.PHONY: setup run study baseline-study recipe-study test test-fast mlflow-ui serve trigger flow-run serve-model cluster bench-serving

setup: $(STAMP)

# Re-installs only when the dependency declaration or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(QUIET) $(PY) -m pip install -q --upgrade pip
	$(QUIET) $(PY) -m pip install -q -c requirements.lock -e '.[pipeline,serve,test]'
	$(PY) -c "import torch, torchvision, timm, onnx, onnxruntime, dvc, mlflow, prefect; print('setup ok: torch', torch.__version__, 'timm', timm.__version__)"
	touch $@

# Each `make run` is one pipeline run in MLflow: its stage runs are grouped under one parent.
run: setup
	ANYORDER_PIPELINE_RUN_ID=$${ANYORDER_PIPELINE_RUN_ID:-make-$$(date -u +%Y%m%dT%H%M%SZ)} \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(QUIET) $(VENV)/bin/dvc repro

# The nullspace study: every arm of nullspace.arms with 3 seeds on the whole test split (after
# `make run`, whose outputs it reads); writes metrics/study/nullspace.{json,md}. About 10 min.
study: run
	$(QUIET) $(PY) -m pipeline.studies.study --seeds 0 1 2

# The baseline study: pre-training length (30, 60, 90, 120 epochs) and fine-tuning with and
# without augmentation, on the default data (after `make run`); writes metrics/study/baseline.{json,md}.
baseline-study: run
	$(QUIET) $(PY) -m pipeline.studies.baseline_study --epochs 30 60 90 120

# The recipe study: does params.yaml's LayerShuffle recipe hold on harder data? Distorted digits
# (10,000 28x28 images built from the embedded ones), the baseline and candidate LS recipes;
# writes metrics/study/recipe_<level>.{json,md}. About 13 min (medium) and 19 min (hard) on 2 cores.
recipe-study: setup
	$(QUIET) $(PY) -m pipeline.studies.recipe_study --level medium --candidates ls ls_epochs2 ls_epochs3
	$(QUIET) $(PY) -m pipeline.studies.recipe_study --level hard --candidates ls ls_lr2 ls_sample ls_epochs2 ls_epochs3 ls_epochs4

# Two workers, one test file each at a time (module fixtures stay in one process); every torch
# in the tests uses one thread, so the two never fight over the cores.
test: setup
	$(QUIET) $(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(QUIET) $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

mlflow-ui: setup
	$(QUIET) $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# --- Scheduled runs (Prefect) ---
# `make serve`: a local Prefect server (127.0.0.1:4200, SQLite under .prefect/) serving the
# pipeline deployment on the cron schedule of pipeline/orchestration/schedule.yaml; Ctrl-C stops
# serve, then the server. `make trigger`: ask the served deployment for a run now. `make flow-run`:
# one flow run in the foreground. Overrides as for `dvc exp run -S`, space-separated:
#   make trigger S="pretrain.train.epochs=5 evaluate.num_orders=10"
# Another schedule for a try-out: make serve CRON="*/5 * * * *".
serve: setup
	$(QUIET) $(PY) -m pipeline.orchestration.scheduler $(if $(CRON),--cron "$(CRON)")

trigger: setup
	$(QUIET) $(PY) -m pipeline.orchestration.flow trigger $(foreach s,$(S),-S "$(s)")

flow-run: setup
	$(QUIET) $(PY) -m pipeline.orchestration.flow run $(foreach s,$(S),-S "$(s)")

# --- Serving the model (anyorder.serving; README, Serving) ---
# `make serve-model`: the HTTP service on http://127.0.0.1:8000 for MODEL (an export directory or
# models:/<name>@champion; the default, exports/ls_best, is written by `make run`). `make cluster`: the same service with the blocks on WORKERS worker
# processes (2 hosts per block) on loopback. Ctrl-C stops either.
MODEL ?= exports/ls_best
WORKERS ?= 4
PORT ?= 8000
serve-model: setup
	$(QUIET) $(VENV)/bin/anyorder-serve $(MODEL) --port $(PORT)

cluster: setup
	$(QUIET) $(VENV)/bin/anyorder-cluster $(MODEL) --workers $(WORKERS) --port $(PORT)

# The serving benchmark (per-hop overhead, load tests): bench/results/serving.json, ~2 min.
bench-serving: setup
	$(QUIET) $(PY) bench/serving_bench.py
