"""The transport's limits (issue 16, items 7 to 9): per-method receive limits checked before
anything parses a request; load shedding with OVERLOADED while probes still answer;
keepalive on both sides; the client service config (retries only for idempotent reads);
and ErrorInfo on what the gRPC library would answer bare (unknown methods)."""

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.admission import CALLS, RUNS
from server.channels import MAX_ATTEMPTS, channel_options, connect, service_config
from server.config import ROOT
from server.envoy_mesh import service_methods
from server.main import Application, interceptors
from tests.fake_llm import FakeLlm, Script
from tests.harness import PASSWORD, Account, Stubs, new_user, running_app, unique_email
from tests.rpc_errors import error_info, retry_delay
from tests.test_lifecycle import cli_env, run_cli, serving

SQLITE_ONLY = pytest.mark.parametrize("database", ["sqlite"], indirect=True)
SERVING = health_pb2.HealthCheckResponse.SERVING
# The settings of `small`: keepalive scaled down from tens of seconds to one, room for
# two agent runs.
SCALED = {
    "keepalive_time_seconds": 1.0,
    "keepalive_timeout_seconds": 1.0,
    "min_client_ping_interval_seconds": 0.5,
    "max_concurrent_runs": 2,
}


async def scrape(app: Application) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The application's /metrics samples by (name, sorted labels)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_value(app: Application, key: Any, expected: float) -> bool:
    return (await scrape(app))[key] == expected


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


async def eventually(check: Any, timeout: float = 20) -> None:
    """Wait until `check()` (sync or async) is true."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if asyncio.iscoroutine(result) else result:
                return
            await asyncio.sleep(0.05)


def padded(make: Any, field: str, size: int) -> Any:
    """The request `make(**{field: "x" * n})` whose encoding is exactly `size` bytes."""
    n = size
    while (request := make(**{field: "x" * n})).ByteSize() > size:
        n -= request.ByteSize() - size
    assert request.ByteSize() == size
    return request


# Receive limits.


async def test_a_login_over_its_limit_is_refused_before_any_handler(
    app: Application, stubs: Stubs
) -> None:
    limit = 64 * 1024  # MAX_REQUEST_BYTES' default: more than a question of 8,000 characters
    email = unique_email("large")
    at_limit = padded(lambda **f: auth_pb.LoginRequest(email=email, **f), "password", limit)
    over = padded(lambda **f: auth_pb.LoginRequest(email=email, **f), "password", limit + 1)
    before = total(await scrape(app), "agentmesh_logins_total")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.auth.Login(over)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert (info.reason, info.domain) == ("REQUEST_TOO_LARGE", "agentmesh")
    assert info.metadata["limit_bytes"] == str(limit)
    assert total(await scrape(app), "agentmesh_logins_total") == before  # no login attempted

    # One byte less reaches the service, which counts a failed login.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.auth.Login(at_limit)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert total(await scrape(app), "agentmesh_logins_total") == before + 1


async def test_an_oversized_registration_stores_nothing(stubs: Stubs) -> None:
    email = unique_email("large")
    big = padded(
        lambda **f: auth_pb.RegisterRequest(email=email, password=PASSWORD, **f),
        "full_name",
        64 * 1024 + 1,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.auth.Register(big)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The address is still free: nothing was stored.
    await stubs.auth.Register(
        auth_pb.RegisterRequest(email=email, password=PASSWORD, full_name="Fits")
    )


async def test_an_oversized_request_without_a_token_is_refused_for_its_size(
    stubs: Stubs,
) -> None:
    """Size comes before auth: a tokenless 1 MiB question is not read as a question."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.agent.Query(agent_pb.QueryRequest(query="q" * 1024 * 1024))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "REQUEST_TOO_LARGE"


async def test_every_message_of_a_client_stream_has_the_limit(app: Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        small = reflection_pb2.ServerReflectionRequest(list_services="")
        call = stub.ServerReflectionInfo(iter([small]))
        assert [r.list_services_response async for r in call]  # it works at all
        large = reflection_pb2.ServerReflectionRequest(host="h" * 70_000, list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.ServerReflectionInfo(iter([small, large])):
                pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "REQUEST_TOO_LARGE"


async def test_an_upload_far_over_the_default_limit_is_accepted(stubs: Stubs) -> None:
    account = await new_user(stubs)
    # A megabyte that passes the type check and fails parsing at once (no embedding work).
    content = b"%PDF-1.4\n" + b"%" * (1024 * 1024)
    response = await stubs.kb.UploadDocument(
        kb.UploadDocumentRequest(filename="large.pdf", content=content),
        metadata=account.metadata,
    )
    assert response.document.size_bytes == len(content)
    await stubs.kb.DeleteDocument(
        kb.DeleteDocumentRequest(document_id=response.document.document_id),
        metadata=account.metadata,
    )


# Errors the gRPC library would answer without details.


@pytest.mark.parametrize(
    "method", ["/agentmesh.nothing.v1.Nothing/Nope", "/agentmesh.auth.v1.AuthService/Nope"]
)
async def test_an_unknown_method_is_unimplemented_with_error_info(
    app: Application, method: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as opened:
        channel: Any = opened
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(method)(b"")
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in channel.unary_stream(method)(b""):
                pass
    for error in (caught.value, streamed.value):
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        assert error_info(error).reason == "METHOD_NOT_FOUND"
    # A made-up name is no metric label.
    assert not any("Nope" in str(labels) for _, labels in await scrape(app))


# Load shedding.


async def test_shedding_metrics_exist_from_the_first_scrape(app: Application) -> None:
    samples = await scrape(app)
    for budget in (CALLS, RUNS):
        assert ("agentmesh_rpcs_shed_total", (("budget", budget),)) in samples
        assert ("agentmesh_rpcs_in_flight", (("budget", budget),)) in samples


async def test_calls_over_the_budget_fail_at_once_and_slots_come_back(
    app: Application, stubs: Stubs
) -> None:
    """The production call pipeline, with room for two calls, on a server whose one method
    waits for the test: a unary handler held open as long as needed, which the services
    cannot offer. It is served under GetCurrentUser's name, so the pipeline treats it as it
    treats that method (a token is needed)."""
    registry = CollectorRegistry()
    limits = {"max_concurrent_rpcs": 2, "max_concurrent_runs": 1}
    settings = app.settings.model_copy(
        update={**limits, "overload_retry_after_seconds": 0.5, "rate_limit_enabled": False}
    )
    account = await new_user(stubs, "held")
    opened = asyncio.Event()
    entered: asyncio.Queue[None] = asyncio.Queue()

    async def wait(request: bytes, context: Any) -> bytes:
        entered.put_nowait(None)
        await opened.wait()
        return b""

    def in_flight() -> float | None:
        return registry.get_sample_value("agentmesh_rpcs_in_flight", {"budget": CALLS})

    def shed() -> float | None:
        return registry.get_sample_value("agentmesh_rpcs_shed_total", {"budget": CALLS})

    server = grpc.aio.server(interceptors=interceptors(settings, app.domain, registry))
    handlers: dict[str, Any] = {"GetCurrentUser": grpc.unary_unary_rpc_method_handler(wait)}
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("agentmesh.auth.v1.UserService", handlers)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened_channel:
            channel: Any = opened_channel
            held_call = channel.unary_unary("/agentmesh.auth.v1.UserService/GetCurrentUser")

            def slow(request: bytes, timeout: float) -> Any:
                return held_call(request, timeout=timeout, metadata=account.metadata)

            held = [asyncio.ensure_future(slow(b"", timeout=60)) for _ in range(2)]
            for _ in held:
                await entered.get()
            # Not queued: refused while the held calls still wait (a queued call would
            # end with DEADLINE_EXCEEDED instead).
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await slow(b"", timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(caught.value).reason == "OVERLOADED"
            assert retry_delay(caught.value) == 0.5
            assert shed() == 1
            assert in_flight() == 2
            # The shed call is counted with its code like any other.
            handled = {"grpc_service": "agentmesh.auth.v1.UserService"}
            handled |= {"grpc_method": "GetCurrentUser", "grpc_type": "unary"}
            handled["grpc_code"] = "RESOURCE_EXHAUSTED"
            assert registry.get_sample_value("grpc_server_handled_total", handled) == 1
            probe = health_pb2_grpc.HealthStub(channel)
            assert (await probe.Check(health_pb2.HealthCheckRequest())).status == SERVING

            # A call whose client gave up gives its slot back.
            held[0].cancel()
            await eventually(lambda: in_flight() == 1)
            again = asyncio.ensure_future(slow(b"", timeout=60))
            await entered.get()
            opened.set()
            await asyncio.gather(held[1], again)
            await slow(b"", timeout=10)
            await eventually(lambda: in_flight() == 0)  # once the server's tasks end
    finally:
        opened.set()
        await server.stop(0)


@pytest.fixture(scope="module")
async def small(
    database: Any, llm: FakeLlm, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Application, Stubs]]:
    """An application with the SCALED settings and the scripted LLM."""
    async with running_app(
        database.url,
        tmp_path_factory.mktemp("transport"),
        llm_base_url=llm.base_url,
        llm_model="scripted-model",
        llm_max_retries=0,
        intent_confidence=1.01,
        **SCALED,
    ) as running:
        yield running


@pytest.fixture
async def gate(llm: FakeLlm) -> AsyncIterator[asyncio.Event]:
    """Every answer stops after its first token until the gate opens."""
    opened = asyncio.Event()
    llm.reset(Script(intent="greeting", answer="Hello there, how can I help?", gate=opened))
    yield opened
    opened.set()


async def first_token(stubs: Stubs, account: Account) -> Any:
    """A StreamQuery read up to its first token (the scripted model then waits)."""
    call = stubs.agent.StreamQuery(
        agent_pb.StreamQueryRequest(query="hello"), metadata=account.metadata, timeout=120
    )
    async for event in call:
        if event.WhichOneof("event") == "token":
            return call
    raise AssertionError("the run ended before its first token")


@SQLITE_ONLY
async def test_runs_over_the_budget_are_shed_while_the_rest_is_served(
    small: tuple[Application, Stubs], gate: asyncio.Event
) -> None:
    app, stubs = small
    account = await new_user(stubs)
    shed_before = total(await scrape(app), "agentmesh_rpcs_shed_total")
    held = [await first_token(stubs, account) for _ in range(2)]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_token(stubs, account)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "OVERLOADED"
    assert retry_delay(caught.value) > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.agent.Query(agent_pb.QueryRequest(query="hi"), metadata=account.metadata)
    assert error_info(caught.value).reason == "OVERLOADED"
    # Probes and the short calls have budgets of their own.
    assert (await stubs.health.Check(health_pb2.HealthCheckRequest())).status == SERVING
    me = await stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(), metadata=account.metadata
    )
    assert me.user.user_id == account.user_id
    samples = await scrape(app)
    assert samples[("agentmesh_rpcs_in_flight", (("budget", RUNS),))] == 2
    assert total(samples, "agentmesh_rpcs_shed_total") == shed_before + 2

    gate.set()
    for call in held:
        async for _ in call:
            pass
    async for _ in stubs.agent.StreamQuery(
        agent_pb.StreamQueryRequest(query="hello again"), metadata=account.metadata
    ):
        pass
    await eventually(
        lambda: scrape_value(app, ("agentmesh_rpcs_in_flight", (("budget", RUNS),)), 0)
    )


# Keepalive.


@SQLITE_ONLY
async def test_a_client_pinging_every_second_is_not_sent_away(
    small: tuple[Application, Stubs],
) -> None:
    """The issue's client pinged every 10 s on an idle Watch and got GOAWAY too_many_pings
    after 30 s; here the server accepts pings every 0.5 s and the client pings every 1 s,
    for 4 s on a connection without calls, then 4 s under an idle Watch."""
    app, _ = small
    async with connect(f"127.0.0.1:{app.grpc_port}", keepalive_time=1, keepalive_timeout=2) as ch:
        probe = health_pb2_grpc.HealthStub(ch)
        assert (await probe.Check(health_pb2.HealthCheckRequest())).status == SERVING
        # GOAWAY on a connection without calls takes the channel out of READY.
        states = set()
        for _ in range(80):
            states.add(ch.get_state())
            await asyncio.sleep(0.05)
        assert states == {grpc.ChannelConnectivity.READY}
        watch = probe.Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        # GOAWAY would end the watch with UNAVAILABLE ("Too many pings").
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(watch.read(), timeout=4)
        watch.cancel()
        assert (await probe.Check(health_pb2.HealthCheckRequest())).status == SERVING


HOLD_A_RUN = """
import asyncio, os, sys
import grpc
from agentmesh.agent.v1 import agent_service_pb2 as pb, agent_service_pb2_grpc as rpc

async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:
        call = rpc.AgentServiceStub(channel).StreamQuery(
            pb.StreamQueryRequest(query="hello"),
            metadata=[("authorization", "Bearer " + os.environ["TOKEN"])],
        )
        await call.read()
        print("started", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@SQLITE_ONLY
async def test_the_server_drops_the_calls_of_a_frozen_client(
    small: tuple[Application, Stubs], gate: asyncio.Event
) -> None:
    """A client that stops answering (SIGSTOP) loses its connection to the server's
    keepalive, and its run gives back its slot."""
    app, stubs = small
    account = await new_user(stubs)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_A_RUN,
        f"127.0.0.1:{app.grpc_port}",
        env={"TOKEN": account.access_token, "PATH": "", "PYTHONPATH": str(ROOT / "gen")},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 60) == b"started\n"
        in_flight = ("agentmesh_rpcs_in_flight", (("budget", RUNS),))
        assert (await scrape(app))[in_flight] == 1
        client.send_signal(signal.SIGSTOP)
        # keepalive time + timeout, with room for a loaded machine
        await eventually(lambda: scrape_value(app, in_flight, 0), timeout=20)
    finally:
        client.kill()
        await client.wait()


async def test_a_frozen_server_fails_the_calls_instead_of_hanging(tmp_path: Path) -> None:
    """SIGSTOP the real server under an open Health.Watch and a unary call: both end with
    UNAVAILABLE once the client's keepalive ping goes unanswered."""
    env = cli_env(
        tmp_path / "data",
        AGENTMESH_ENVOY_ENABLED="false",
        AGENTMESH_MIN_CLIENT_PING_INTERVAL_SECONDS="0.5",
    )
    assert (await run_cli("migrate", env=env))[0] == 0
    async with serving(env) as served:
        target = served.addresses["grpc"]
        async with connect(target, keepalive_time=1, keepalive_timeout=1) as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            watch = probe.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            served.process.send_signal(signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                check = probe.Check(health_pb2.HealthCheckRequest())  # no deadline
                for call in (watch.read(), check):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await asyncio.wait_for(call, timeout=30)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                # keepalive time + timeout, with room for a loaded machine
                assert time.monotonic() - stopped < 15
            finally:
                served.process.send_signal(signal.SIGCONT)


# The client's service config.


def _configured(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method path (or service, as `/Service/`) → the methodConfig naming it."""
    named: dict[str, dict[str, Any]] = {}
    for entry in config["methodConfig"]:
        for name in entry["name"]:
            path = f"/{name['service']}/{name.get('method', '')}"
            assert path not in named, f"{path} is in two methodConfigs"
            named[path] = entry
    return named


def test_only_idempotent_reads_are_retried_and_every_method_has_a_deadline() -> None:
    config = service_config()
    named = _configured(config)
    retried = {path for path, entry in named.items() if "retryPolicy" in entry}
    # The same reads as Envoy's mesh routes retry, read from the descriptor set.
    methods = service_methods(ROOT / "gen" / "agentmesh.binpb")
    reads = {m.path for service in methods.values() for m in service if m.reads}
    assert retried == reads
    every = {
        m.path
        for name, service in methods.items()
        if name.startswith("agentmesh.")
        for m in service
    }
    never = {
        "/agentmesh.knowledge.v1.KnowledgeBaseService/UploadDocument",
        "/agentmesh.agent.v1.AgentService/Query",
        "/agentmesh.agent.v1.AgentService/StreamQuery",
        "/agentmesh.auth.v1.AuthService/Login",
        "/agentmesh.auth.v1.AuthService/RefreshToken",
        "/agentmesh.auth.v1.AuthService/Register",
    }
    assert never <= every and not never & retried
    assert "/agentmesh.knowledge.v1.KnowledgeBaseService/ListDocuments" in retried
    for path in retried:
        policy = named[path]["retryPolicy"]
        assert 2 <= policy["maxAttempts"] <= 5
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryThrottling"]["maxTokens"] > 0
    for path in every:
        service = path.rsplit("/", 1)[0] + "/"
        assert "timeout" in named.get(path, named.get(service, {})), path
    options = dict(channel_options())
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0


class Flaky(grpc.GenericRpcHandler):
    """Answers every method UNAVAILABLE `failures` times, then an empty message, counting
    attempts and the `grpc-previous-rpc-attempts` each carried."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, list[str | None]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        async def answer(request: bytes, context: Any) -> bytes:
            metadata = dict(context.invocation_metadata())
            seen = self.attempts.setdefault(details.method, [])
            seen.append(metadata.get("grpc-previous-rpc-attempts"))
            if len(seen) <= self.failures:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)


@contextlib.asynccontextmanager
async def flaky_server(failures: int) -> AsyncIterator[tuple[Flaky, str]]:
    handler = Flaky(failures)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


KB = "/agentmesh.knowledge.v1.KnowledgeBaseService/"


async def test_a_read_is_retried_on_unavailable_and_a_write_never() -> None:
    async with flaky_server(failures=2) as (handler, target):
        reads: list[tuple[str, Any]] = [
            ("ListDocuments", kb.ListDocumentsRequest()),
            ("SearchKnowledgeBase", kb.SearchKnowledgeBaseRequest(query="q")),
        ]
        for name, request in reads:
            async with connect(target) as channel:  # each with a full retry-token bucket
                await getattr(kb_grpc.KnowledgeBaseServiceStub(channel), name)(request)
        async with connect(target) as channel:
            stub = kb_grpc.KnowledgeBaseServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UploadDocument(kb.UploadDocumentRequest(filename="a.txt"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert handler.attempts[KB + "ListDocuments"] == [None, "1", "2"]
    assert handler.attempts[KB + "SearchKnowledgeBase"] == [None, "1", "2"]
    assert handler.attempts[KB + "UploadDocument"] == [None]


async def test_retries_stop_at_max_attempts_and_under_throttling() -> None:
    async with flaky_server(failures=1000) as (handler, target), connect(target) as channel:
        stub = kb_grpc.KnowledgeBaseServiceStub(channel)
        seen = []
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListDocuments(kb.ListDocumentsRequest())
            seen.append(len(handler.attempts.pop(KB + "ListDocuments")))
    # Each failure takes a token of 10; at 5 or fewer left, nothing is retried.
    assert seen[0] == MAX_ATTEMPTS
    assert seen[-1] == 1
