# GEM knowledge serving. `make up` runs the local stack, `make test` the tests;
# both set up .venv first (idempotent: re-installs only when pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup up test lint protos bench loadtest soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# The client package first: the server depends on it, and no registry has it.
	$(VENV)/bin/pip install --quiet -e ./client -e ".[dev]"
	touch $(STAMP)

up: setup
	$(VENV)/bin/gem up

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

# Regenerate client/gem/knowledge/v1 from protos/ (committed; tests/test_api.py checks it is current).
protos: setup
	$(VENV)/bin/python protos/generate.py

bench: setup
	$(VENV)/bin/python -m bench.inference
	$(VENV)/bin/python -m bench.frontend
	$(VENV)/bin/python -m bench.breakdown
	$(VENV)/bin/python -m bench.big_calls
	$(VENV)/bin/python -m bench.embed
	$(VENV)/bin/python -m bench.trainer

# Headless Locust against a running `make up` (60 s; CSV, HTML and summary.json in
# artifacts/loadtest/). Flags: loadtests/locust.conf, or LOCUST_ARGS="--rate 40 ...".
loadtest: setup
	$(VENV)/bin/locust -f loadtests/locustfile.py --config loadtests/locust.conf --host 127.0.0.1:50051 $(LOCUST_ARGS)

# The soak (loadtests/soak.py): its own stack and side trainer, Locust at 70 % of the
# capacity for 20 min under a fault schedule, then the bounds (exit 1 when one is broken);
# soak.json and soak.png in artifacts/soak/. Flags: SOAK_ARGS="--minutes 3 --rate 10 ...".
soak: setup
	$(VENV)/bin/python -m loadtests.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
