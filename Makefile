# keysvc — the targets people run are the targets CI runs.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help install run test test-python lint proto clean demo

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install keysvc with its test tools

run: install ## serve on 127.0.0.1:50051 (keys from OPENAI_KEY)
	$(VENV)/bin/keysvc serve

demo: install ## fake upstream + keysvc + key checker, shown through the gRPC API
	$(PY) scripts/demo.py

lint: install ## ruff and mypy --strict on the package
	$(VENV)/bin/ruff check keysvc tests scripts
	$(VENV)/bin/ruff format --check keysvc tests
	$(VENV)/bin/mypy keysvc

test-python: install
	$(PY) -m pytest

test: lint test-python ## every test tier

proto: install ## regenerate the checked-in code from protos/
	PYTHON=$(PY) scripts/gen_proto.sh

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
