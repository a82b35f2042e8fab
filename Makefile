# One entry point for people and CI. `make run` = the whole pipeline on the embedded default;
# `make test` = the test suite. Both install what they need first (fast when already installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# No telemetry, no version checks: this machine has no internet and nothing may hang on it.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast repro-check mlflow-ui clean-outputs

setup: $(STAMP)

# Re-installs only when the dependency declaration or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[pipeline,test]'
	$(PY) -c "import torch, torchvision, timm, onnx, onnxruntime, dvc, mlflow, prefect; print('setup ok: torch', torch.__version__, 'timm', timm.__version__)"
	touch $@

# Each `make run` is one pipeline run in MLflow: its stage runs are grouped under one parent.
run: setup
	ANYORDER_PIPELINE_RUN_ID=$${ANYORDER_PIPELINE_RUN_ID:-make-$$(date -u +%Y%m%dT%H%M%SZ)} \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# --- Scheduled runs (Prefect) ---
# `make serve`: a local Prefect server (127.0.0.1:4200, SQLite under $(PREFECT_HOME)) serving the
# pipeline deployment on the cron schedule of pipeline/schedule.yaml; Ctrl-C stops serve, then the
# server. `make trigger`: ask the served deployment for a run now. `make flow-run`: one flow run
# in the foreground. Overrides as for `dvc exp run -S`, space-separated:
#   make trigger S="pretrain.epochs=5 evaluate.num_orders=10"
# Another schedule for a try-out: make serve CRON="*/5 * * * *".
.PHONY: serve trigger flow-run
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

serve: setup
	$(PY) pipeline/scheduler.py $(if $(CRON),--cron "$(CRON)")

trigger: setup
	$(PY) pipeline/flow.py trigger $(foreach s,$(S),-S "$(s)")

flow-run: setup
	$(PY) pipeline/flow.py run $(foreach s,$(S),-S "$(s)")
