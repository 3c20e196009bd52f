# GEM knowledge serving. `make up` runs the local stack, `make test` the tests;
# both set up .venv first (idempotent: re-installs only when pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup up test lint protos bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

up: setup
	$(VENV)/bin/gem up

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

# Regenerate gem/knowledge/ from protos/ (committed; tests/test_api.py checks it is current).
protos: setup
	$(VENV)/bin/python protos/generate.py

bench: setup
	$(VENV)/bin/python -m bench.inference
	$(VENV)/bin/python -m bench.frontend

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
