"""What Envoy lets through to agentmesh (issue 16): REST bodies capped by route before Envoy
buffers them (413, RESOURCE_EXHAUSTED), uploads large only with an authorization header,
gRPC untouched (streams included), and a circuit breaker on the gRPC cluster. Against a
real Envoy in front of the real server; a refusal is checked where it shows: the server's
own /metrics and Envoy's upstream counters, and Envoy's memory while a large body comes.
"""

import asyncio
import base64
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb_pb
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.config import ROOT, SERVICE_KEYS, Settings
from server.envoy import (
    BODY_CAP_ROUTES,
    EnvoyFront,
    EnvoySidecar,
    edge_limits,
    envoy_config,
    public_manager,
    render_front,
    too_large_message,
    upload_body_bytes,
)
from server.envoy_mesh import mesh_envoy_config
from server.main import Application
from tests.harness import Account, Stubs, new_user, rpc_count
from tests.rpc_errors import field_violations

JSON = dict[str, Any]
MIB = 1024 * 1024
UPLOAD = "/v1/kb/documents"
# How long Envoy may take to answer a request it refuses (it answers at once; generous).
ANSWER_SECONDS = 10.0
# A small Envoy in front of the same server: caps small enough to reach with real uploads.
SMALL = {
    "envoy_max_public_body_bytes": 4096,
    "envoy_max_body_bytes": 8192,
    "max_upload_bytes": 24 * 1024,
}
SMALL_UPLOAD_CAP = 4 * 8192 + 8192
DEFAULTS = Settings(_env_file=None)  # type: ignore[call-arg]
DEFAULT_MESSAGE = too_large_message(edge_limits(DEFAULTS))
SMALL_MESSAGE = too_large_message(edge_limits(DEFAULTS.model_copy(update=SMALL)))


# ---- HTTP/1.1 by hand: Envoy may answer (and close) while the body is still coming ----


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: JSON
    sent: int
    """Body bytes written before Envoy answered."""


async def exchange(
    port: int,
    path: str,
    chunks: Iterable[bytes],
    *,
    length: int | None,
    token: str | None = None,
    origin: str | None = None,
) -> Answer:
    """POST `chunks` with Content-Length `length`, or chunked when it is None, reading the
    answer while writing: stop writing once it comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"POST {path} HTTP/1.1", "host: agentmesh", "content-type: application/json"]
    head.append("connection: close")
    head.append(f"content-length: {length}" if length is not None else "transfer-encoding: chunked")
    if token is not None:
        head.append(f"authorization: Bearer {token}")
    if origin is not None:
        head.append(f"origin: {origin}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    received = bytearray()
    answered = asyncio.Event()

    async def read() -> None:
        # Until Envoy closes; a refusal may end with a reset (the body was left unread).
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                received.extend(data)
                answered.set()

    reading = asyncio.ensure_future(read())
    sent = 0
    try:
        for chunk in chunks:
            if answered.is_set():
                break
            writer.write(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
        else:
            if length is None:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
    except ConnectionError:
        pass  # Envoy answered and closed while the body was coming
    try:
        await asyncio.wait_for(reading, ANSWER_SECONDS)
    finally:
        writer.close()
    head_bytes, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head_bytes, f"no answer after {sent} bytes"
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    status = int(status_line.split(" ", 2)[1])
    return Answer(status, headers, json.loads(body) if body.strip() else {}, sent)


def upload_json(content: bytes, size: int | None = None) -> bytes:
    """An UploadDocument JSON body, padded with whitespace to `size` bytes."""
    encoded = base64.b64encode(content).decode()
    body = f'{{"filename": "limits.txt", "content": "{encoded}"}}'.encode()
    if size is None:
        return body
    assert len(body) <= size
    return body[:1] + b" " * (size - len(body)) + body[1:]


def pieces(body: bytes, size: int = 16 * 1024) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def endless_upload(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """The start of an upload whose content runs on for `total` bytes."""
    yield b'{"filename": "big.txt", "content": "'
    block = b"QUJD" * (size // 4)
    for _ in range(total // size):
        yield block


def refused(answer: Answer, message: str = "") -> None:
    """A 413 with the google.rpc.Status-shaped body Envoy gives (its message names the caps)."""
    assert answer.status == 413, answer
    assert answer.body["code"] == 8  # RESOURCE_EXHAUSTED
    assert answer.body["message"] == (message or DEFAULT_MESSAGE)
    (info,) = answer.body["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["reason"], info["domain"]) == ("REQUEST_TOO_LARGE", "agentmesh")


def refused_at_once(answer: Answer, message: str = "") -> None:
    """Refused on the headers: not one byte of the body was sent."""
    refused(answer, message)
    assert answer.sent == 0


# ---- what reached the server ----


async def started(app: Application, method: str) -> float:
    """Calls of `method` that reached the server, by its own /metrics."""
    return await rpc_count(app, "grpc_server_started_total", method)


async def envoy_stat(envoy: EnvoySidecar, name: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{envoy.admin_url}/stats", params={"filter": f"^{name}$"}) as response,
    ):
        text = await response.text()
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())


UPSTREAM_REQUESTS = "cluster.agentmesh_grpc.upstream_rq_total"
# Calls the circuit breaker refused (max_requests).
BREAKER_OVERFLOWS = "cluster.agentmesh_grpc.upstream_rq_active_overflow"


def memory_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# ---- Envoys in front of the session's server ----


def sidecar(app: Application, workdir: Path, **overrides: Any) -> EnvoySidecar:
    settings = app.settings.model_copy(
        update={
            "http_host": "127.0.0.1",
            "http_port": 0,
            "envoy_admin_port": 0,
            "grpc_host": "127.0.0.1",
            "metrics_host": "127.0.0.1",
            **overrides,
        }
    )
    config = envoy_config(settings, grpc_port=app.grpc_port, ops_port=app.ops.port)
    return EnvoySidecar(settings.resolved_envoy_binary, config, workdir)


@pytest.fixture
async def fresh_envoy(app: Application, tmp_path: Path) -> AsyncIterator[EnvoySidecar]:
    """An Envoy of the default config that no other test has used (its memory is its own)."""
    envoy = sidecar(app, tmp_path)
    await envoy.start()
    yield envoy
    await envoy.stop()


@pytest.fixture(scope="module")
async def small_envoy(
    app: Application, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EnvoySidecar]:
    envoy = sidecar(app, tmp_path_factory.mktemp("small-envoy"), **SMALL)
    await envoy.start()
    yield envoy
    await envoy.stop()


@pytest.fixture(scope="module")
async def account(stubs: Stubs) -> Account:
    return await new_user(stubs, "limits")


# ---- the rendered configs ----


def routes_of(config: JSON) -> dict[str, JSON]:
    found = public_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    return {route["name"]: route for route in found if "name" in route}


def caps_of(config: JSON) -> dict[str, int]:
    """Each capped route's cap, checked against its twin's Content-Length range."""
    routes = routes_of(config)
    caps = {}
    for name in BODY_CAP_ROUTES:
        per_route = routes[name]["typed_per_filter_config"]["envoy.filters.http.buffer"]
        cap = per_route["buffer"]["max_request_bytes"]
        twin = routes[name + "-too-large"]
        (length,) = [h for h in twin["match"]["headers"] if h["name"] == "content-length"]
        assert length["range_match"]["start"] == cap + 1
        # The fault filter refuses it on its headers; a route action keeps CORS working.
        fault = twin["typed_per_filter_config"]["envoy.filters.http.fault"]
        assert fault["abort"] == {"http_status": 413, "percentage": {"numerator": 100}}
        assert "route" in twin
        caps[name] = cap
    return caps


def transcoder_of(config: JSON) -> JSON:
    manager = public_manager(config)
    found: JSON = next(
        item["typed_config"]
        for item in manager["http_filters"]
        if item["name"] == "envoy.filters.http.grpc_json_transcoder"
    )
    return found


def validate(config: JSON, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert "&id" not in path.read_text(), "a dict used twice: YAML aliases in the config"
    result = subprocess.run(
        [DEFAULTS.resolved_envoy_binary, "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_upload_cap_fits_a_base64_upload_and_its_envelope() -> None:
    assert upload_body_bytes(20 * MIB, MIB) == 4 * 6_990_507 + MIB
    assert upload_body_bytes(3, 0) == 4 and upload_body_bytes(4, 0) == 8
    assert upload_body_bytes(SMALL["max_upload_bytes"], SMALL["envoy_max_body_bytes"]) == (
        SMALL_UPLOAD_CAP
    )


def test_the_template_holds_the_default_limits() -> None:
    """envoy/envoy.yaml as it is equals its rendering with the default settings, so the
    numbers written there are the ones `agentmesh serve` uses when nothing is set."""
    template = yaml.safe_load(DEFAULTS.envoy_config_template.read_text())
    rendered = envoy_config(DEFAULTS, grpc_port=50051, ops_port=9464)
    # Rendering makes the descriptor's path and those of the files Envoy serves (the OpenAPI
    # document, the chat page) absolute: each is the template's, resolved from the root.
    transcoder_of(rendered)["proto_descriptor"] = transcoder_of(template)["proto_descriptor"]
    served = {
        name: route["direct_response"]["body"]
        for name, route in routes_of(rendered).items()
        if "filename" in route.get("direct_response", {}).get("body", {})
    }
    assert set(served) == {"openapi", "web-page", "web-script", "web-style"}
    for name, body in served.items():
        original = routes_of(template)[name]["direct_response"]["body"]["filename"]
        assert body["filename"] == str((ROOT / original).resolve())
        body["filename"] = original
    assert rendered == template
    assert caps_of(template) == {
        "rest-upload": upload_body_bytes(DEFAULTS.max_upload_bytes, 1 * MIB),
        "rest-authenticated": 1 * MIB,
        "rest-public": 64 * 1024,
    }


def test_rendered_sidecar_config_caps_bodies_and_breaks_circuits(tmp_path: Path) -> None:
    settings = DEFAULTS.model_copy(
        update={**SMALL, "envoy_max_requests": 7, "envoy_max_pending_requests": 3}
    )
    config = envoy_config(settings, grpc_port=50051, ops_port=9464)
    validate(config, tmp_path / "envoy.yaml")
    assert caps_of(config) == {
        "rest-upload": SMALL_UPLOAD_CAP,
        "rest-authenticated": 8192,
        "rest-public": 4096,
    }
    assert transcoder_of(config)["max_request_body_size"] == SMALL_UPLOAD_CAP
    assert transcoder_of(config)["max_response_body_size"] > 0
    mappers = public_manager(config)["local_reply_config"]["mappers"]
    (mapper,) = [m for m in mappers if "413" in json.dumps(m["filter"])]
    assert mapper["body_format_override"]["json_format"]["message"] == SMALL_MESSAGE
    assert (
        "request body too large: at most 4096 bytes without an authorization header,"
        f" 8192 with one, {SMALL_UPLOAD_CAP} for an upload"
    ) == SMALL_MESSAGE
    # The buffer filter is off unless a REST route turns it on: gRPC is never buffered.
    manager = public_manager(config)
    (buffer,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
    assert buffer["disabled"] is True
    names = [f["name"] for f in manager["http_filters"]]
    assert names.index("envoy.filters.http.buffer") < names.index(
        "envoy.filters.http.grpc_json_transcoder"
    )
    for route in routes_of(config).values():
        per_route = route.get("typed_per_filter_config", {})
        if "envoy.filters.http.buffer" in per_route:
            assert route["match"].get("prefix") == "/v1/" or route["name"] == "rest-upload"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    (thresholds,) = clusters["agentmesh_grpc"]["circuit_breakers"]["thresholds"]
    assert (thresholds["max_requests"], thresholds["max_pending_requests"]) == (7, 3)


def test_rendering_refuses_a_template_without_the_capped_routes() -> None:
    template = yaml.safe_load(DEFAULTS.envoy_config_template.read_text())
    routes = public_manager(template)["route_config"]["virtual_hosts"][0]["routes"]
    routes[:] = [route for route in routes if route.get("name") != "rest-public-too-large"]
    front = EnvoyFront("127.0.0.1", 0, 0, DEFAULTS.descriptor_set, limits=edge_limits(DEFAULTS))
    with pytest.raises(ValueError, match="rest-public-too-large"):
        render_front(template, front)


def test_mesh_config_caps_bodies_and_breaks_circuits_per_replica(tmp_path: Path) -> None:
    settings = DEFAULTS.model_copy(
        update={**SMALL, "envoy_max_requests": 100, "envoy_max_pending_requests": 10}
    )
    upstreams: dict[str, list[str]] = {
        key: [f"{key}-1:50051", f"{key}-2:50051"] for key in SERVICE_KEYS
    }
    upstreams["knowledge"] = ["knowledge:50051"]
    config = mesh_envoy_config(settings, upstreams=upstreams, ops=["agentmesh:9464"])
    validate(config, tmp_path / "mesh.yaml")
    assert caps_of(config) == {
        "rest-upload": SMALL_UPLOAD_CAP,
        "rest-authenticated": 8192,
        "rest-public": 4096,
    }
    assert transcoder_of(config)["max_request_body_size"] == SMALL_UPLOAD_CAP
    # They come first (after /health), before any route by gRPC path.
    names = list(routes_of(config))
    assert names[1:7] == [
        f"rest-{kind}{twin}"
        for kind in ("upload", "authenticated", "public")
        for twin in ("-too-large", "")
    ]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for key in SERVICE_KEYS:
        (thresholds,) = clusters[f"svc_{key}"]["circuit_breakers"]["thresholds"]
        replicas = len(upstreams[key])
        assert thresholds["max_requests"] == 100 * replicas, key
        assert thresholds["max_pending_requests"] == 10 * replicas, key
        assert thresholds["retry_budget"]["budget_percent"] == {"value": 20.0}
    (ops,) = clusters["agentmesh_ops"]["circuit_breakers"]["thresholds"]
    assert "max_requests" not in ops


# ---- a real Envoy in front of the real server ----


async def test_an_oversized_upload_without_a_token_is_refused_at_once(
    app: Application, envoy: EnvoySidecar
) -> None:
    uploads, upstream = (
        await started(app, "UploadDocument"),
        await envoy_stat(envoy, UPSTREAM_REQUESTS),
    )
    # 300 MB announced, not one byte of it sent: the answer comes on the headers alone.
    refused_at_once(await exchange(envoy.port, UPLOAD, [], length=300 * 1000 * 1000))
    refused_at_once(await exchange(envoy.port, UPLOAD + "/", [], length=300 * 1000 * 1000))
    # A browser of an allowed origin can read the refusal (CORS applies to it).
    origin = "https://app.example.com"
    answer = await exchange(envoy.port, UPLOAD, [], length=300 * 1000 * 1000, origin=origin)
    refused_at_once(answer)
    assert answer.headers["access-control-allow-origin"] == origin
    assert await started(app, "UploadDocument") == uploads
    assert await envoy_stat(envoy, UPSTREAM_REQUESTS) == upstream


async def test_an_oversized_body_with_a_content_length_is_refused_at_once_on_small_routes(
    app: Application, envoy: EnvoySidecar, account: Account
) -> None:
    searches, logins = await started(app, "SearchKnowledgeBase"), await started(app, "Login")
    upstream = await envoy_stat(envoy, UPSTREAM_REQUESTS)
    answer = await exchange(
        envoy.port, "/v1/kb/search", [], length=1 * MIB + 1, token=account.access_token
    )
    refused_at_once(answer)
    refused_at_once(await exchange(envoy.port, "/v1/auth/login", [], length=64 * 1024 + 1))
    # Sent whole, the same: nothing was read.
    body = b'{"query": "' + b"q" * (2 * MIB) + b'"}'
    answer = await exchange(
        envoy.port, "/v1/kb/search", pieces(body), length=len(body), token=account.access_token
    )
    refused(answer)
    assert await started(app, "SearchKnowledgeBase") == searches
    assert await started(app, "Login") == logins
    assert await envoy_stat(envoy, UPSTREAM_REQUESTS) == upstream


async def test_a_chunked_body_is_refused_once_it_passes_the_cap(
    app: Application, envoy: EnvoySidecar, account: Account
) -> None:
    registers, searches = await started(app, "Register"), await started(app, "SearchKnowledgeBase")
    upstream = await envoy_stat(envoy, UPSTREAM_REQUESTS)
    body = b'{"email": "' + b"e" * (50 * MIB) + b'"}'
    answer = await exchange(envoy.port, "/v1/auth/register", pieces(body), length=None)
    refused(answer)
    # Refused as it passed 64 KiB: what was written beyond that sat in socket buffers.
    assert answer.sent < 16 * MIB
    body = b'{"query": "' + b"q" * (50 * MIB) + b'"}'
    answer = await exchange(
        envoy.port, "/v1/kb/search", pieces(body), length=None, token=account.access_token
    )
    refused(answer)
    assert answer.sent < 16 * MIB
    # Without a token an upload gets no more than any public call.
    answer = await exchange(envoy.port, UPLOAD, endless_upload(50 * MIB), length=None)
    refused(answer)
    assert answer.sent < 16 * MIB
    assert await started(app, "Register") == registers
    assert await started(app, "SearchKnowledgeBase") == searches
    assert await envoy_stat(envoy, UPSTREAM_REQUESTS) == upstream


async def test_envoy_memory_does_not_grow_with_a_large_refused_body(
    app: Application, fresh_envoy: EnvoySidecar, stubs: Stubs
) -> None:
    assert fresh_envoy.pid is not None
    uploads = await started(app, "UploadDocument")
    before = memory_kib(fresh_envoy.pid, "VmHWM")
    answer = await exchange(
        fresh_envoy.port, UPLOAD, endless_upload(200 * 1000 * 1000), length=None
    )
    growth_mib = (memory_kib(fresh_envoy.pid, "VmHWM") - before) / 1024
    assert growth_mib < 50, f"Envoy's peak memory grew by {growth_mib:.0f} MiB"
    refused(answer)
    assert await started(app, "UploadDocument") == uploads
    # And Envoy still serves.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{fresh_envoy.port}/health") as response,
    ):
        assert response.status == 200


async def test_an_upload_up_to_the_cap_passes_with_a_token_only(
    app: Application, small_envoy: EnvoySidecar, account: Account
) -> None:
    text = b"".join(b"Limit sentence number %d about capped uploads.\n" % i for i in range(2000))
    content = text[: SMALL["max_upload_bytes"]]
    at_cap = upload_json(content, SMALL_UPLOAD_CAP)
    uploads = await started(app, "UploadDocument")
    token = account.access_token
    answer = await exchange(
        small_envoy.port, UPLOAD, pieces(at_cap), length=len(at_cap), token=token
    )
    assert answer.status == 200, answer
    assert answer.body["document"]["size_bytes"] == str(len(content))
    # Chunked, exactly at the cap: the same document again.
    answer = await exchange(small_envoy.port, UPLOAD, pieces(at_cap), length=None, token=token)
    assert answer.status == 200 and answer.body["deduplicated"] is True, answer
    assert await started(app, "UploadDocument") == uploads + 2

    # One byte more is refused, announced or not.
    over = upload_json(content, SMALL_UPLOAD_CAP + 1)
    answer = await exchange(small_envoy.port, UPLOAD, [], length=len(over), token=token)
    refused_at_once(answer, SMALL_MESSAGE)
    answer = await exchange(small_envoy.port, UPLOAD, pieces(over), length=None, token=token)
    refused(answer, SMALL_MESSAGE)
    # Without a token the upload meets the public cap.
    answer = await exchange(small_envoy.port, UPLOAD, [], length=len(at_cap))
    refused_at_once(answer, SMALL_MESSAGE)
    refused(await exchange(small_envoy.port, UPLOAD, pieces(at_cap), length=None), SMALL_MESSAGE)
    assert await started(app, "UploadDocument") == uploads + 2


@pytest.mark.parametrize(
    ("path", "method", "with_token", "cap"),
    [
        ("/v1/auth/login", "Login", False, SMALL["envoy_max_public_body_bytes"]),
        (UPLOAD, "UploadDocument", False, SMALL["envoy_max_public_body_bytes"]),
        ("/v1/kb/search", "SearchKnowledgeBase", True, SMALL["envoy_max_body_bytes"]),
    ],
)
async def test_each_route_takes_its_cap_and_not_a_byte_more(
    app: Application,
    small_envoy: EnvoySidecar,
    account: Account,
    path: str,
    method: str,
    with_token: bool,
    cap: int,
) -> None:
    token = account.access_token if with_token else None
    fields = {
        "/v1/auth/login": b'"email": "nobody@example.com", "password": "not the password"',
        UPLOAD: b'"filename": "a.txt", "content": "dGV4dA=="',
        "/v1/kb/search": b'"query": "capped bodies"',
    }[path]
    at_cap = b"{" + b" " * (cap - len(fields) - 2) + fields + b"}"
    assert len(at_cap) == cap
    before = await started(app, method)
    # At the cap the server answers (whatever it answers), sent either way.
    for length in (len(at_cap), None):
        answer = await exchange(small_envoy.port, path, pieces(at_cap), length=length, token=token)
        assert answer.status != 413, answer
    assert await started(app, method) == before + 2
    over = at_cap + b" "
    refused_at_once(
        await exchange(small_envoy.port, path, [], length=len(over), token=token), SMALL_MESSAGE
    )
    answer = await exchange(small_envoy.port, path, pieces(over), length=None, token=token)
    refused(answer, SMALL_MESSAGE)
    assert await started(app, method) == before + 2


async def test_a_normal_authenticated_upload_still_works(
    rest: aiohttp.ClientSession, account: Account
) -> None:
    headers = {"authorization": f"Bearer {account.access_token}"}
    text = b"".join(b"Normal note %d: uploads over the public cap pass.\n" % i for i in range(1600))
    assert 64 * 1024 < len(text) < 1 * MIB
    body = {"filename": "normal.txt", "content": base64.b64encode(text).decode()}
    async with rest.post(UPLOAD, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        document = (await response.json())["document"]
    assert document["size_bytes"] == str(len(text))
    # A body beyond the authenticated cap reaches the server on the upload route: the
    # server, not Envoy, judges its content (bytes that are not text here).
    body = {"filename": "binary.txt", "content": base64.b64encode(b"\xff" * (2 * MIB)).decode()}
    async with rest.post(UPLOAD, json=body, headers=headers) as response:
        assert response.status == 400, await response.text()
        answer = await response.json()
    violations = next(d for d in answer["details"] if d["@type"].endswith("BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["content"]


async def test_grpc_through_envoy_is_not_capped_nor_buffered(
    envoy: EnvoySidecar, account: Account
) -> None:
    through_envoy = Stubs.connect(f"127.0.0.1:{envoy.port}")
    try:
        me = await through_envoy.users.GetCurrentUser(
            users_pb.GetCurrentUserRequest(), metadata=account.metadata, timeout=10
        )
        assert me.user.user_id == account.user_id
        # 2 MiB over gRPC, beyond every REST cap but the upload's: the server judges it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await through_envoy.kb.UploadDocument(
                kb_pb.UploadDocumentRequest(filename="binary.txt", content=b"\xff" * (2 * MIB)),
                metadata=account.metadata,
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(caught.value)) == ["content"]

        # A server stream: its first message comes while it runs.
        watch = through_envoy.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        # A bidirectional stream answers each request before the client ends its side:
        # Envoy does not hold the request stream until it is complete.
        reflection = reflection_pb2_grpc.ServerReflectionStub(through_envoy.channel)
        call = reflection.ServerReflectionInfo(timeout=10)
        for _ in range(2):
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            response = await asyncio.wait_for(call.read(), 5)
            names = {s.name for s in response.list_services_response.service}
            assert "agentmesh.knowledge.v1.KnowledgeBaseService" in names
        await call.done_writing()
    finally:
        await through_envoy.channel.close()


async def test_the_circuit_breaker_fails_a_flood_fast(
    app: Application, tmp_path: Path, account: Account
) -> None:
    envoy = sidecar(app, tmp_path, envoy_max_requests=2)
    await envoy.start()
    through_envoy = Stubs.connect(f"127.0.0.1:{envoy.port}")
    watches = []
    try:
        # Two long calls in flight fill the breaker...
        for _ in range(2):
            watch = through_envoy.health.Watch(health_pb2.HealthCheckRequest(service=""))
            await watch.read()
            watches.append(watch)
        overflows = await envoy_stat(envoy, BREAKER_OVERFLOWS)
        # ...so the next one fails at once, over gRPC and over REST.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await through_envoy.users.GetCurrentUser(
                users_pb.GetCurrentUserRequest(), metadata=account.metadata, timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        headers = {"authorization": f"Bearer {account.access_token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{envoy.port}/v1/users/me", headers=headers) as response,
        ):
            assert response.status == 503
            assert response.headers.get("x-envoy-overloaded") == "true"
            assert (await response.json())["code"] == 14
        after = await envoy_stat(envoy, BREAKER_OVERFLOWS)
        assert after == overflows + 2
        # Room again once they end.
        for watch in watches:
            watch.cancel()
        watches.clear()
        for _ in range(50):
            try:
                await through_envoy.users.GetCurrentUser(
                    users_pb.GetCurrentUserRequest(), metadata=account.metadata, timeout=10
                )
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the breaker did not close")
    finally:
        for watch in watches:
            watch.cancel()
        await through_envoy.channel.close()
        await envoy.stop()
