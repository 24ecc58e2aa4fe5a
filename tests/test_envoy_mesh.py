"""Envoy as the mesh's front and router (server/envoy_mesh.py): the rendered config checked
by a real Envoy, then a real Envoy in front of two real agentmesh replicas over one
PostgreSQL database: the load reaches both, reads and writes survive one replica stopping,
no replica left means UNAVAILABLE, and a write that reached a replica is never sent again
while a read is."""

import contextlib
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from prometheus_client.parser import text_string_to_metric_families

from server.config import ROOT, SERVICE_KEYS, Settings
from server.envoy import EnvoyFront, EnvoySidecar, public_manager
from server.envoy_mesh import (
    FRONT_SERVICE,
    FULL_NAMES,
    RETRIES,
    SERVED_WITH,
    mesh_config,
    service_methods,
)
from server.main import Application, build_application
from server.served import SERVICES
from tests.backends import Database
from tests.h2_cut_proxy import H2CutProxy
from tests.harness import Account, Stubs, new_user, settings_for
from tools.check_generated import OPENAPI3

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
# The design decision the routes carry: the calls Envoy may send to a second replica after
# the first one saw them. Every other unary call is retried only when no replica saw it.
IDEMPOTENT_READS = {
    "/agentmesh.auth.v1.UserService/GetCurrentUser",
    "/agentmesh.auth.v1.UserService/ListUsers",
    "/agentmesh.auth.v1.UserService/GetUser",
    "/agentmesh.auth.v1.UserService/ExportCurrentUser",
    "/agentmesh.auth.v1.ApiKeyService/ListApiKeys",
    "/agentmesh.teams.v1.GroupService/GetGroup",
    "/agentmesh.teams.v1.GroupService/ListGroups",
    "/agentmesh.teams.v1.GroupService/ListGroupMembers",
    "/agentmesh.agent.v1.AgentService/ListConversations",
    "/agentmesh.agent.v1.AgentService/GetConversation",
    "/agentmesh.knowledge.v1.KnowledgeBaseService/ListDocuments",
    "/agentmesh.knowledge.v1.KnowledgeBaseService/GetDocument",
    "/agentmesh.knowledge.v1.KnowledgeBaseService/SearchKnowledgeBase",
    "/agentmesh.knowledge.v1.CollectionService/GetCollection",
    "/agentmesh.knowledge.v1.CollectionService/ListCollections",
    "/agentmesh.knowledge.v1.CollectionService/ListCollectionGrants",
    "/agentmesh.feedback.v1.FeedbackService/ListFeedback",
    "/agentmesh.feedback.v1.FeedbackService/GetFeedbackStats",
    "/agentmesh.analytics.v1.AnalyticsService/GetUsage",
    "/agentmesh.analytics.v1.AnalyticsService/GetSystemStats",
    "/agentmesh.analytics.v1.AnalyticsService/GetUserStats",
    "/agentmesh.audit.v1.AuditService/ListAuditEvents",
}
BEFORE_REQUEST = {"connect-failure", "refused-stream", "reset-before-request"}


def front(listen_port: int = 0, admin_port: int = 0) -> EnvoyFront:
    return EnvoyFront("127.0.0.1", listen_port, admin_port, SETTINGS.descriptor_set)


def render(upstreams: dict[str, list[str]], ops: list[str]) -> dict[str, Any]:
    return mesh_config(SETTINGS.envoy_config_template, front(), upstreams, ops)


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = public_manager(config)["route_config"]["virtual_hosts"][0][
        "routes"
    ]
    return found


def route_for(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The route Envoy takes for `path`: the first that matches."""
    return next(
        route
        for route in routes(config)
        if route["match"].get("path") == path
        or ("prefix" in route["match"] and path.startswith(route["match"]["prefix"]))
    )


def retry_on(route: dict[str, Any]) -> set[str]:
    return set(route["route"]["retry_policy"]["retry_on"].split(","))


def every_method() -> Iterator[tuple[str, Any]]:
    """Every public method with the key of the service whose cluster serves it (GroupService
    is served with the users')."""
    methods = service_methods(SETTINGS.descriptor_set)
    for key, name in [*FULL_NAMES.items(), *((k, n) for n, k in SERVED_WITH.items())]:
        for method in methods[name]:
            yield key, method


# ---- the rendered config ----


def test_the_mesh_services_are_the_served_ones() -> None:
    assert {service.key: service.name for service in SERVICES} == FULL_NAMES
    assert {name: service.key for service in SERVICES for name in service.also} == SERVED_WITH
    assert list(FULL_NAMES) == list(SERVICE_KEYS)


def test_mesh_config_is_valid_for_envoy(tmp_path: Path) -> None:
    upstreams = {key: [f"{key}-1.internal:50051", f"{key}-2.internal:50051"] for key in FULL_NAMES}
    upstreams["knowledge"] = ["knowledge:50051"]
    config = render(upstreams, ["agentmesh:9464", "knowledge:9464"])
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert "&id" not in path.read_text(), "a dict used twice: YAML aliases in the config"
    result = subprocess.run(
        [SETTINGS.resolved_envoy_binary, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    assert set(clusters) == {f"svc_{key}" for key in FULL_NAMES} | {
        "agentmesh_ops",
        "agentmesh_mcp",
    }
    for key, name in FULL_NAMES.items():
        cluster = clusters[f"svc_{key}"]
        # A DNS name stands for every replica it resolves to (a scaled compose service).
        assert cluster["type"] == "STRICT_DNS"
        hosts = [
            "{address}:{port_value}".format(**host["endpoint"]["address"]["socket_address"])
            for host in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ]
        assert hosts == upstreams[key]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": name}
        assert check["unhealthy_threshold"] == 2 and check["healthy_threshold"] == 1
        assert cluster["outlier_detection"]["split_external_local_origin_errors"] is True
        assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    ops = clusters["agentmesh_ops"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(ops) == 2
    # /mcp goes to the knowledge replicas' MCP servers (MCP_PORT on their hosts), over HTTP/1.1.
    (mcp,) = clusters["agentmesh_mcp"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert mcp["endpoint"]["address"]["socket_address"] == {
        "address": "knowledge",
        "port_value": SETTINGS.mcp_port,
    }
    assert "typed_extension_protocol_options" not in clusters["agentmesh_mcp"]
    (mcp_route,) = [route for route in routes(config) if route.get("name") == "mcp"]
    assert mcp_route["route"]["cluster"] == "agentmesh_mcp"


def test_every_method_is_routed_to_its_service_with_retries_only_where_safe() -> None:
    config = render({key: ["127.0.0.1:50051"] for key in FULL_NAMES}, ["127.0.0.1:9464"])
    reads = set()
    for key, method in every_method():
        route = route_for(config, method.path)
        assert route["route"]["cluster"] == f"svc_{key}", method.path
        assert route["route"]["retry_policy"]["num_retries"] == RETRIES
        conditions = retry_on(route)
        if method.streams:
            assert route["route"]["timeout"] == "0s", method.path
            assert conditions == {"connect-failure", "refused-stream"}, method.path
        elif "unavailable" in conditions:
            assert conditions == BEFORE_REQUEST | {"reset", "unavailable"}, method.path
            reads.add(method.path)
        else:
            # A call that reached a replica is never sent to another.
            assert conditions == BEFORE_REQUEST, method.path
            assert route["route"]["timeout"] != "0s", method.path
    assert reads == IDEMPOTENT_READS
    assert route_for(config, "/agentmesh.agent.v1.AgentService/Query")["route"]["timeout"] == (
        "300s"
    )


def test_reflection_health_and_unknown_paths_go_to_the_front_service() -> None:
    config = render({key: ["127.0.0.1:50051"] for key in FULL_NAMES}, ["127.0.0.1:9464"])
    for path in (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/Check",
        "/no.such.Service/Method",
    ):
        assert route_for(config, path)["route"]["cluster"] == f"svc_{FRONT_SERVICE}", path
    assert route_for(config, "/health")["route"]["cluster"] == "agentmesh_ops"
    internal = route_for(config, "/agentmesh.indexing.v1.IndexingService/UpsertPassages")
    assert internal["direct_response"] == {"status": 404}


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('{"agent": ["a:1"], "nope": ["b:2"]}', "unknown services nope"),
        ('{"agent": ["agent:50051"]}', "no upstream for auth, users, api_keys, knowledge"),
        (json.dumps({key: ["no-port"] for key in SERVICE_KEYS}), "'no-port' is not host:port"),
        ("agent=a:1", "not JSON"),
    ],
)
def test_settings_refuse_upstreams_that_miss_or_invent_a_service(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Settings(_env_file=None, envoy_upstreams=value)  # type: ignore[call-arg, arg-type]


def test_settings_read_upstreams_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    upstreams = {key: [f"{key}:50051", f"{key}-2:50051"] for key in SERVICE_KEYS}
    monkeypatch.setenv("AGENTMESH_ENVOY_UPSTREAMS", json.dumps(upstreams))
    monkeypatch.setenv("AGENTMESH_ENVOY_OPS_UPSTREAMS", "agentmesh:9464, knowledge:9464")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.envoy_upstreams == upstreams
    assert settings.envoy_ops_upstreams == ["agentmesh:9464", "knowledge:9464"]
    monkeypatch.setenv("AGENTMESH_ENVOY_UPSTREAMS", "")
    assert Settings(_env_file=None).envoy_upstreams == {}  # type: ignore[call-arg]


# ---- a real Envoy in front of real replicas ----


@pytest.fixture(scope="module")
async def shared_database(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """One PostgreSQL database for every replica, as in production."""
    database = Database("postgres", tmp_path_factory.mktemp("mesh-db"))
    await database.create()
    await database.migrate()
    yield database.url
    await database.drop()


class Replicas:
    """Started applications over one database; each stopped once, here or at the end."""

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self._database_url = database_url
        self._tmp_path = tmp_path
        self.apps: list[Application] = []
        self._running: list[Application] = []

    async def start(self) -> Application:
        data_dir = self._tmp_path / f"replica-{len(self.apps)}"
        app = build_application(settings_for(self._database_url, data_dir))
        await app.start()
        self.apps.append(app)
        self._running.append(app)
        return app

    async def stop(self, app: Application) -> None:
        self._running.remove(app)
        await app.stop(grace=0)

    async def stop_all(self) -> None:
        for app in list(self._running):
            await self.stop(app)


@contextlib.asynccontextmanager
async def mesh_envoy(
    workdir: Path, upstreams: dict[str, list[str]], ops: list[str]
) -> AsyncIterator[EnvoySidecar]:
    sidecar = EnvoySidecar(SETTINGS.resolved_envoy_binary, render(upstreams, ops), workdir)
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop()


async def test_the_mesh_front_serves_the_openapi_document_and_the_page_itself(
    tmp_path: Path,
) -> None:
    """GET /openapi.json and the chat page (GET /, /app.js, /app.css) are Envoy's own
    answers in the mesh as in the sidecar: they need no replica (nothing listens where the
    upstreams point)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    upstreams = {key: [nowhere] for key in FULL_NAMES}
    served = {
        "/openapi.json": (ROOT / "gen" / OPENAPI3, "application/json"),
        "/": (ROOT / "web" / "index.html", "text/html; charset=utf-8"),
        "/app.js": (ROOT / "web" / "app.js", "text/javascript; charset=utf-8"),
        "/app.css": (ROOT / "web" / "app.css", "text/css; charset=utf-8"),
    }
    async with (
        mesh_envoy(tmp_path / "envoy", upstreams, [nowhere]) as envoy,
        aiohttp.ClientSession() as http,
    ):
        for path, (source, content_type) in served.items():
            async with http.get(f"http://127.0.0.1:{envoy.port}{path}") as response:
                assert response.status == 200, path
                assert response.headers["content-type"] == content_type, path
                assert await response.read() == source.read_bytes(), path


def grpc_address(app: Application) -> str:
    return f"127.0.0.1:{app.grpc_port}"


def ops_address(app: Application) -> str:
    return f"127.0.0.1:{app.ops.port}"


async def started(app: Application, method: str) -> float:
    """Calls of `method` that reached `app`, by its own /metrics."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{ops_address(app)}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_started_total" and sample.labels["grpc_method"] == method
    )


async def me(stubs: Stubs, account: Account) -> users_pb.GetCurrentUserResponse:
    return await stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(), metadata=account.metadata, timeout=10
    )


async def rename(stubs: Stubs, account: Account, name: str) -> None:
    await stubs.users.UpdateCurrentUser(
        users_pb.UpdateCurrentUserRequest(user=user_pb.User(full_name=name)),
        metadata=account.metadata,
        timeout=10,
    )


async def test_two_replicas_share_the_load_and_survive_one_stopping(
    shared_database: str, tmp_path: Path
) -> None:
    replicas = Replicas(shared_database, tmp_path)
    try:
        first, second = await replicas.start(), await replicas.start()
        upstreams = {key: [grpc_address(first), grpc_address(second)] for key in FULL_NAMES}
        ops = [ops_address(first), ops_address(second)]
        async with mesh_envoy(tmp_path / "envoy", upstreams, ops) as envoy:
            stubs = Stubs.connect(f"127.0.0.1:{envoy.port}")
            rest = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{envoy.port}")
            try:
                account = await new_user(stubs, "mesh")
                for _ in range(10):
                    assert (await me(stubs, account)).user.email == account.email
                # Round robin over two healthy replicas: both served some.
                assert await started(first, "GetCurrentUser") > 0
                assert await started(second, "GetCurrentUser") > 0

                await replicas.stop(second)
                before = await started(first, "GetCurrentUser")
                for round_ in range(10):
                    assert (await me(stubs, account)).user.email == account.email
                    # A write that never reached the stopped replica is safe to send on.
                    await rename(stubs, account, f"Mesh {round_}")
                assert await started(first, "GetCurrentUser") == before + 10
                assert (await me(stubs, account)).user.full_name == "Mesh 9"
                headers = {"authorization": f"Bearer {account.access_token}"}
                async with rest.get("/v1/users/me", headers=headers) as response:
                    assert response.status == 200
                    assert (await response.json())["user"]["email"] == account.email
                async with rest.get("/health") as response:
                    assert response.status == 200

                await replicas.stop(first)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await me(stubs, account)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                async with rest.get("/v1/users/me", headers=headers) as response:
                    assert response.status == 503
                    assert (await response.json())["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
            finally:
                await rest.close()
                await stubs.channel.close()
    finally:
        await replicas.stop_all()


async def test_a_write_that_reached_a_replica_is_never_sent_again_a_read_is(
    shared_database: str, tmp_path: Path
) -> None:
    """UserService's only upstream lets calls through and cuts every connection as the
    replica starts to answer: the replica did the work, Envoy saw a reset."""
    replicas = Replicas(shared_database, tmp_path)
    proxy: H2CutProxy | None = None
    try:
        app = await replicas.start()
        proxy = H2CutProxy("127.0.0.1", app.grpc_port)
        await proxy.start()
        upstreams = {key: [grpc_address(app)] for key in FULL_NAMES}
        upstreams["users"] = [f"127.0.0.1:{proxy.port}"]
        async with mesh_envoy(tmp_path / "envoy", upstreams, [ops_address(app)]) as envoy:
            stubs = Stubs.connect(f"127.0.0.1:{envoy.port}")
            try:
                account = await new_user(stubs, "cut")

                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await rename(stubs, account, "Once")
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                assert await started(app, "UpdateCurrentUser") == 1

                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await me(stubs, account)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                assert await started(app, "GetCurrentUser") == 1 + RETRIES
            finally:
                await stubs.channel.close()
    finally:
        if proxy is not None:
            await proxy.stop()
        await replicas.stop_all()
