# Two commands set up a fresh machine: `make demo` and `make test` (each installs first).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ROOT ?= qarm-data
WORLD ?= small

# Loopback-only, offline, no Ray token auth: every process that starts or joins Spark/Ray (ENVIRONMENT.md §0).
export SPARK_LOCAL_IP := 127.0.0.1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_DISABLE_USAGE_STATS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export AWS_EC2_METADATA_DISABLED := true
export PYSPARK_PYTHON := $(CURDIR)/$(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(BIN)/python

.PHONY: install demo demo-movielens notebooks test test-fast lint clean

# Re-installs only when pyproject.toml changes; torch is pinned there to the local CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qarm demo --world $(WORLD) --root $(ROOT)

demo-movielens: $(STAMP)
	$(BIN)/qarm demo --movielens ../shared/data/ml-latest-small --root $(ROOT)-movielens

# Executes every notebook against $(ROOT) (after `make demo`); executed copies land in notebooks/executed/.
notebooks: $(STAMP)
	mkdir -p notebooks/executed
	QARM_ROOT=$(ROOT) $(BIN)/jupyter execute --timeout=600 --output='executed/{notebook_name}' notebooks/0*.ipynb

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check qarm_dist tests bench jobs

clean:
	rm -rf $(ROOT) $(ROOT)-movielens .pytest_cache .ruff_cache
