# keysvc — the targets people run are the targets CI runs.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help install run test test-python lint proto clean demo bench
.PHONY: tools lint-proto test-clients test-client-python test-client-go test-client-node

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -e clients/python
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
	$(VENV)/bin/ruff check clients
	$(VENV)/bin/ruff format --check clients/python/src clients/python/tests clients/test_codegen.py
	$(VENV)/bin/mypy clients/python/src clients/python/examples
	$(VENV)/bin/ruff check bench
	$(VENV)/bin/ruff format --check bench
	$(VENV)/bin/mypy --strict bench
	$(MAKE) --no-print-directory lint-proto

test-python: install
	$(PY) -m pytest

test: lint test-python test-clients ## every test tier

bench: install ## the benchmarks in full (~8 min; bench/README.md); writes bench/RESULTS.md
	$(PY) -m bench

proto: install tools ## regenerate the checked-in code (Python, Go, Node) from protos/
	PYTHON=$(PY) scripts/gen_proto.sh
	PYTHON=$(PY) scripts/gen_clients.sh

# --- clients (clients/README.md) -------------------------------------------------------
# Pinned tools: Go-built ones from tools/go.mod into .tools/bin, buf from tools/package.json.
TOOLS := .tools/bin
TOOLS_STAMP := $(TOOLS)/.stamp
NODE_STAMP := clients/node/node_modules/.stamp
export GOFLAGS := -buildvcs=false

$(TOOLS_STAMP): tools/go.mod tools/go.sum tools/package.json tools/package-lock.json
	mkdir -p $(TOOLS)
	cd tools && GOBIN=$(CURDIR)/$(TOOLS) go install tool
	cd tools && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

tools: $(TOOLS_STAMP) $(NODE_STAMP) ## install the pinned codegen/test tools (Go, npm)

lint-proto: $(TOOLS_STAMP) ## buf lint (STANDARD) on protos/
	tools/node_modules/.bin/buf lint protos

test-client-python: install $(TOOLS_STAMP) ## Python client and grpcurl tests
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(PY) -m pytest -p no:cacheprovider clients/python/tests

test-codegen: install tools ## the checked-in Go and TypeScript code is fresh
	$(PY) -m pytest -p no:cacheprovider clients/test_codegen.py

test-client-go: install tools
	cd clients/go && KEYSVC_BIN=$(CURDIR)/$(VENV)/bin/keysvc go test -count=1 ./...

test-client-node: install tools
	cd clients/node && KEYSVC_BIN=$(CURDIR)/$(VENV)/bin/keysvc npm test

test-clients: test-codegen test-client-python test-client-go test-client-node ## every client suite against a live keysvc

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis $(TOOLS) tools/node_modules clients/node/node_modules clients/node/dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
