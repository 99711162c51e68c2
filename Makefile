# chromoseg: `make run` (install, data, full pipeline, summary) and `make test` do all set-up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export GIT_PYTHON_REFRESH := quiet
# The store named in params.yaml (mlflow.tracking_uri), made absolute.
TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns.db
UI_PORT ?= 5000
SERVE_PORT ?= 5001
PYTEST_ARGS ?=

.PHONY: install run data repro summary test test-slow test-integration lint format ui serve bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

# The dataset: DVC remote if reachable, else the deterministic synthetic default (scripts/get_data.sh).
data: install
	@scripts/get_data.sh

repro: data
	dvc repro

summary: install
	@chromoseg summary

# Each part's wall time and the total are printed at the end.
run:
	@t0=$$(date +%s); \
	$(MAKE) --no-print-directory install && t1=$$(date +%s) && \
	$(MAKE) --no-print-directory data && t2=$$(date +%s) && \
	dvc repro && t3=$$(date +%s) && \
	chromoseg summary && \
	echo "wall time: install $$((t1 - t0)) s, data $$((t2 - t1)) s, pipeline $$((t3 - t2)) s, total $$(( $$(date +%s) - t0 )) s"

test: install
	$(BIN)/pytest -m "not slow and not integration" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/pytest -m "slow" $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,integration]'
	$(BIN)/pytest -m "integration" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

ui: install
	mlflow ui --backend-store-uri $(TRACKING_URI) --default-artifact-root $(CURDIR)/mlartifacts --port $(UI_PORT)

serve: install
	MLFLOW_TRACKING_URI=$(TRACKING_URI) mlflow models serve -m models:/chromoseg-unet@champion --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

bench: install
	chromoseg bench

clean:
	rm -rf data/prepared models plots metrics eval .chromoseg
