"""PostgreSQL or Redis taken away mid-run (a TCP proxy in front of the real servers is cut):
calls are UNAVAILABLE with ErrorInfo (REST 503), never INTERNAL, and everything works again
on its own once the server is back."""

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from grpc_health.v1 import health_pb2
from procrastinate.exceptions import ConnectorException

from services.outages import outage_of
from tests.backends import Database
from tests.harness import Account, Stubs, new_user, running_app
from tests.limited import REDIS_URL, limited_app, redis_up
from tests.rpc_errors import error_info
from tests.tcp_proxy import TcpProxy, proxy_to


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database("postgres", tmp_path)
    await database.create()
    await database.migrate()
    yield database
    await database.drop()


@pytest.fixture
async def proxy_for_postgres(postgres: Database) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy in front of the test's PostgreSQL, and the database URL through it."""
    parts = urlsplit(postgres.url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    through = parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
    try:
        yield proxy, through.geturl()
    finally:
        await proxy.stop()


USERS = "agentmesh.auth.v1.UserService"
AUTH = "agentmesh.auth.v1.AuthService"
AGENT = "agentmesh.agent.v1.AgentService"
PROBE_ROUNDS = 60.0  # seconds: the monitor probes every 10 s, each probe waits 2 s at most


async def until_health(stubs: Stubs, service: str, wanted: int) -> None:
    """Poll grpc.health.v1 until `service` reports `wanted` (fails after PROBE_ROUNDS)."""
    request = health_pb2.HealthCheckRequest(service=service)
    deadline = asyncio.get_running_loop().time() + PROBE_ROUNDS
    while (await stubs.health.Check(request)).status != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{service!r} never became {wanted}"
        await asyncio.sleep(0.5)


async def me(stubs: Stubs, account: Account) -> None:
    await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=account.metadata)


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_the_durable_queue_losing_its_database_is_an_outage() -> None:
    """procrastinate wraps psycopg's errors in ConnectorException ("Database error."); an
    upload whose job could not be queued because PostgreSQL went away is UNAVAILABLE, not
    INTERNAL (the fault test caught it once, cutting the database mid-upload)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        await psycopg.AsyncConnection.connect(f"host=127.0.0.1 port={port} connect_timeout=2")
    except psycopg.OperationalError as refused:
        try:
            raise ConnectorException() from refused
        except ConnectorException as wrapped:
            error = wrapped
    outage = outage_of(error)
    assert outage is not None and outage.reason == "DATABASE_UNAVAILABLE"
    assert outage_of(ConnectorException()) is None  # nothing says the database is away


async def conversations(stubs: Stubs, user: Account) -> agent_pb.ListConversationsResponse:
    """A call that reads the database every time."""
    return await stubs.agent.ListConversations(
        agent_pb.ListConversationsRequest(), metadata=user.metadata
    )


async def test_postgres_gone_is_unavailable_and_comes_back(
    proxy_for_postgres: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    proxy, url = proxy_for_postgres
    async with running_app(url, tmp_path / "data") as (_, stubs):
        user = await new_user(stubs)
        await conversations(stubs, user)

        await proxy.stop()  # every pooled connection is cut, and new ones are refused
        # (Not GetCurrentUser: it answers a warm account from memory, issue 17.)
        for _ in range(3):
            error = await failure(conversations(stubs, user))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(error).reason == "DATABASE_UNAVAILABLE"
            assert "127.0.0.1" not in (error.details() or "")

        # Health follows the database probe (every 10 s): load balancers route around.
        await until_health(stubs, "", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until_health(stubs, USERS, health_pb2.HealthCheckResponse.NOT_SERVING)

        await proxy.start()
        await conversations(stubs, user)  # no restart: pre-ping replaces dead connections
        await until_health(stubs, "", health_pb2.HealthCheckResponse.SERVING)
        await until_health(stubs, USERS, health_pb2.HealthCheckResponse.SERVING)


async def test_redis_gone_is_unavailable_for_queries_and_comes_back(tmp_path: Path) -> None:
    await redis_up()
    async with (
        proxy_to(REDIS_URL, 6379) as proxy,
        limited_app(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        ) as (app, stubs),
    ):
        user = await new_user(stubs)
        query = agent_pb.QueryRequest(query="hello there")
        await stubs.agent.Query(query, metadata=user.metadata)

        await proxy.stop()
        # The agent needs Redis (runs, quotas); signing in does not (the limiter fails
        # open): only the first turns NOT_SERVING.
        await until_health(stubs, AGENT, health_pb2.HealthCheckResponse.NOT_SERVING)
        response = await stubs.health.Check(health_pb2.HealthCheckRequest(service=AUTH))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        error = await failure(stubs.agent.Query(query, metadata=user.metadata))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert error_info(error).reason in {"REDIS_UNAVAILABLE", "RUN_LOG_UNAVAILABLE"}
        usage = analytics_pb.GetUsageRequest()
        analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
        error = await failure(analytics.GetUsage(usage, metadata=user.metadata))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert error_info(error).reason == "QUOTA_UNAVAILABLE"  # the quota counters

        await proxy.start()
        for _ in range(50):  # the client reconnects on its next command
            try:
                await stubs.agent.Query(query, metadata=user.metadata)
                break
            except grpc.aio.AioRpcError as retry:
                assert retry.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
        else:
            pytest.fail("Redis came back but queries kept failing")
        await until_health(stubs, AGENT, health_pb2.HealthCheckResponse.SERVING)
        assert app.domain.redis is not None


async def test_first_calls_after_redis_restarts_succeed(tmp_path: Path) -> None:
    """Redis restarting between two calls leaves every pooled connection dead, unseen until
    used: the clients send again on a fresh connection, so the first calls succeed."""
    await redis_up()
    async with (
        proxy_to(REDIS_URL, 6379) as proxy,
        limited_app(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            rate_limit_fail_open=False,  # a limiter failure would refuse, not pass unseen
            quota_fail_open=False,  # and so would a quota counter's
        ) as (app, stubs),
    ):
        user = await new_user(stubs)
        analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
        query = agent_pb.QueryRequest(query="hello there")
        usage = analytics_pb.GetUsageRequest()
        await stubs.agent.Query(query, metadata=user.metadata)
        await analytics.GetUsage(usage, metadata=user.metadata)

        await proxy.sever()
        await me(stubs, user)
        await proxy.sever()
        decision = await app.domain.limiter.hit(f"probe:{user.user_id}", 10, 60.0)
        assert decision.allowed  # the limiter's own client
        await proxy.sever()
        assert (await analytics.GetUsage(usage, metadata=user.metadata)).quotas
        await proxy.sever()
        await stubs.agent.Query(query, metadata=user.metadata)  # quotas, the run log
        assert app.domain.limiter.failures == 0
