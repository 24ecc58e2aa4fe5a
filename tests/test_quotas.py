"""Quotas on agent queries and tokens: through the real server (in process and on the
real Redis, concurrently), the day and month resets with a fixed clock, and GetUsage."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.analytics.v1 import analytics_pb2, analytics_service_pb2
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc

from server.main import Application
from services.auth.principal import Principal, Role
from services.errors import ResourceExhausted
from services.metrics import Metrics
from services.quotas.counters import CountersUnavailable, InProcessCounters
from services.quotas.service import Limits, QuotaService
from tests.fake_llm import FakeLlm, Script
from tests.harness import Account, Stubs, new_admin, new_user
from tests.knowledge import upload
from tests.limited import REDIS_URL, exhausted, limited_app, redis_up
from tests.rpc_errors import error_info, quota_violations, retry_delay
from tests.tcp_proxy import TcpProxy


async def ask(stubs: Stubs, account: Account) -> agent_pb.QueryResponse:
    reply: agent_pb.QueryResponse = await stubs.agent.Query(
        agent_pb.QueryRequest(query="hello"), metadata=account.metadata
    )
    return reply


async def refused(call: Any) -> grpc.aio.AioRpcError:
    return await exhausted(call, "QUOTA_EXCEEDED")


async def test_daily_query_quota_refuses_with_details_and_spares_admins(tmp_path: Path) -> None:
    async with limited_app(tmp_path, quota_user_daily_queries=2) as (app, stubs):
        user, other = await new_user(stubs), await new_user(stubs)
        admin = await new_admin(app, stubs)
        for _ in range(2):
            await ask(stubs, user)
        error = await refused(ask(stubs, user))
        assert quota_violations(error) == [(f"user:{user.user_id}", "2 day agent queries")]
        now = datetime.now(UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        assert 0 < retry_delay(error) <= (midnight - now).total_seconds() + 1
        # The refused query stored nothing, and others are unaffected.
        listed = await stubs.agent.ListConversations(
            agent_pb.ListConversationsRequest(), metadata=user.metadata
        )
        assert len(listed.conversations) == 2
        await ask(stubs, other)
        for _ in range(3):  # administrators are unlimited by default
            await ask(stubs, admin)


@pytest.fixture
async def llm() -> AsyncIterator[FakeLlm]:
    server = FakeLlm()
    await server.start()
    yield server
    await server.stop()


async def test_the_run_that_uses_up_the_tokens_finishes_and_the_next_is_refused(
    tmp_path: Path, llm: FakeLlm
) -> None:
    llm.script = Script(intent="greeting", answer="Hello there, friend.")
    async with limited_app(
        tmp_path, llm_base_url=llm.base_url, llm_max_retries=0, quota_user_daily_tokens=10
    ) as (_, stubs):
        user = await new_user(stubs)
        first = await ask(stubs, user)
        assert first.message.usage.total_tokens > 10
        error = await refused(ask(stubs, user))
        assert quota_violations(error) == [(f"user:{user.user_id}", "10 day agent tokens")]


async def test_concurrent_queries_never_exceed_the_quota_on_redis(tmp_path: Path) -> None:
    await redis_up()
    async with limited_app(
        tmp_path,
        redis_url=REDIS_URL,
        quota_user_daily_queries=5,
        max_concurrent_runs_per_user=100,
    ) as (_, stubs):
        user = await new_user(stubs)
        results = await asyncio.gather(
            *(ask(stubs, user) for _ in range(20)), return_exceptions=True
        )
    ok = [r for r in results if isinstance(r, agent_pb.QueryResponse)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 5 and len(errors) == 15
    assert {error_info(e).reason for e in errors} == {"QUOTA_EXCEEDED"}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_quotas_reset_at_midnight_and_month_start_and_refunds_refusals() -> None:
    clock = Clock(datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC))
    counters = InProcessCounters()
    quotas = QuotaService(
        counters, {Role.USER: Limits(daily_queries=1, monthly_queries=2)}, clock=clock
    )
    user = Principal(uuid.uuid4(), Role.USER)
    await quotas.admit_query(user)
    with pytest.raises(ResourceExhausted) as daily:
        await quotas.admit_query(user)
    assert daily.value.retry_after == pytest.approx(1.0)
    assert daily.value.violations[0].description == "1 day agent queries"

    clock.now = datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC)  # a new day and a new month
    await quotas.admit_query(user)
    clock.now = datetime(2026, 2, 2, 12, 0, tzinfo=UTC)
    await quotas.admit_query(user)  # the second of February's two
    clock.now = datetime(2026, 2, 3, 12, 0, tzinfo=UTC)
    with pytest.raises(ResourceExhausted) as monthly:
        await quotas.admit_query(user)
    assert monthly.value.violations[0].description == "2 month agent queries"
    assert monthly.value.retry_after == pytest.approx(
        (datetime(2026, 3, 1, tzinfo=UTC) - clock.now).total_seconds()
    )
    # The refused query's daily count was taken back: the day still has its one query.
    assert await counters.read([f"quota:{user.user_id}:queries:2026-02-03"]) == [0]


async def test_get_usage_reports_windows_and_quotas(tmp_path: Path, llm: FakeLlm) -> None:
    llm.script = Script(intent="greeting", answer="Hello there, friend.")
    async with limited_app(
        tmp_path,
        llm_base_url=llm.base_url,
        llm_max_retries=0,
        quota_user_daily_queries=10,
        quota_user_daily_tokens=5000,
    ) as (app, stubs):
        user = await new_user(stubs)
        admin = await new_admin(app, stubs)
        replies = [await ask(stubs, user) for _ in range(2)]
        await upload(stubs, user, "note.txt", b"Quarterly figures are in the appendix.")
        analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
        async with asyncio.timeout(30):  # events are written within a second
            while True:
                usage = await analytics.GetUsage(
                    analytics_service_pb2.GetUsageRequest(), metadata=user.metadata
                )
                if usage.today.queries == 2 and usage.today.documents_uploaded == 1:
                    break
                await asyncio.sleep(0.2)
        admin_usage = await analytics.GetUsage(
            analytics_service_pb2.GetUsageRequest(), metadata=admin.metadata
        )
    tokens_in = sum(r.message.usage.prompt_tokens for r in replies)
    tokens_out = sum(r.message.usage.completion_tokens for r in replies)
    for window in (usage.today, usage.this_week, usage.this_month):
        assert (window.queries, window.tokens_in, window.tokens_out) == (2, tokens_in, tokens_out)
        assert window.documents_uploaded == 1
    assert usage.this_week.start_time.ToDatetime().weekday() == 0  # ISO weeks start on Monday
    quotas = {(q.metric, q.granularity): q for q in usage.quotas}
    day_queries = quotas[(analytics_pb2.QUOTA_METRIC_AGENT_QUERIES, analytics_pb2.GRANULARITY_DAY)]
    assert (day_queries.limit, day_queries.used, day_queries.remaining) == (10, 2, 8)
    assert day_queries.resets_at == usage.today.end_time and not day_queries.unlimited
    day_tokens = quotas[(analytics_pb2.QUOTA_METRIC_TOKENS, analytics_pb2.GRANULARITY_DAY)]
    assert (day_tokens.limit, day_tokens.used) == (5000, tokens_in + tokens_out)
    assert all(q.unlimited and q.remaining == 0 for q in admin_usage.quotas)


@contextlib.asynccontextmanager
async def redis_behind_proxy() -> AsyncIterator[TcpProxy]:
    """A proxy in front of the test Redis, whose replies a test can hold back."""
    await redis_up()
    parts = urlsplit(REDIS_URL)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def quota_failures(app: Application, operation: str) -> float:
    registry = app.domain.metrics.registry
    value = registry.get_sample_value(
        "agentmesh_quota_check_failures_total", {"operation": operation}
    )
    return value or 0.0


# Replies held back this long exceed the quota counters' timeout below (and the limiter's,
# which fails open), but not the run log's.
SLOW_REPLIES = 0.3
QUOTA_TIMEOUT = 0.1


async def test_quotas_fail_open_admit_uncounted_queries_while_redis_is_slow(
    tmp_path: Path,
) -> None:
    async with (
        redis_behind_proxy() as proxy,
        limited_app(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            redis_timeout_seconds=QUOTA_TIMEOUT,
            quota_user_daily_queries=1,
        ) as (app, stubs),
    ):
        user = await new_user(stubs)
        proxy.reply_delay = SLOW_REPLIES
        for _ in range(2):  # over the daily quota of 1: the counters cannot say so
            await ask(stubs, user)
        assert quota_failures(app, "admit") >= 2

        proxy.reply_delay = 0.0  # Redis is fast again: the quota counts again, unaided
        await ask(stubs, user)
        await refused(ask(stubs, user))


async def test_quotas_fail_closed_refuse_unavailable_while_redis_is_slow(tmp_path: Path) -> None:
    async with (
        redis_behind_proxy() as proxy,
        limited_app(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            redis_timeout_seconds=QUOTA_TIMEOUT,
            quota_fail_open=False,
        ) as (app, stubs),
    ):
        user = await new_user(stubs)
        analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
        usage = analytics_service_pb2.GetUsageRequest()
        proxy.reply_delay = SLOW_REPLIES
        for call in (ask(stubs, user), analytics.GetUsage(usage, metadata=user.metadata)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert error_info(caught.value).reason == "QUOTA_UNAVAILABLE"
        assert quota_failures(app, "admit") >= 1 and quota_failures(app, "status") >= 1
        listed = await stubs.agent.ListConversations(
            agent_pb.ListConversationsRequest(), metadata=user.metadata
        )
        assert list(listed.conversations) == []  # the refused query ran nowhere

        proxy.reply_delay = 0.0
        await ask(stubs, user)
        quotas = (await analytics.GetUsage(usage, metadata=user.metadata)).quotas
        day = analytics_pb2.QUOTA_METRIC_AGENT_QUERIES, analytics_pb2.GRANULARITY_DAY
        assert {(q.metric, q.granularity): q.used for q in quotas}[day] == 1


async def test_quota_counters_outwait_a_redis_slower_than_the_limiters_timeout(
    tmp_path: Path,
) -> None:
    async with (
        redis_behind_proxy() as proxy,
        limited_app(tmp_path, redis_url=f"redis://127.0.0.1:{proxy.port}/0") as (app, stubs),
    ):
        user = await new_user(stubs)
        analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
        proxy.reply_delay = 0.15  # thrice the limiter's 50 ms (it fails open), a busy Redis
        await ask(stubs, user)
        usage = await analytics.GetUsage(
            analytics_service_pb2.GetUsageRequest(), metadata=user.metadata
        )
        day = analytics_pb2.QUOTA_METRIC_AGENT_QUERIES, analytics_pb2.GRANULARITY_DAY
        assert {(q.metric, q.granularity): q.used for q in usage.quotas}[day] == 1
        assert quota_failures(app, "admit") == quota_failures(app, "status") == 0


class FlakyCounters(InProcessCounters):
    """In-process counters that fail once `adds_left` additions have succeeded."""

    def __init__(self) -> None:
        super().__init__()
        self.adds_left: int | None = None  # None: never fail

    async def add(self, key: str, amount: int, ttl_seconds: int) -> int:
        if self.adds_left == 0:
            raise CountersUnavailable("broken")
        if self.adds_left is not None:
            self.adds_left -= 1
        return await super().add(key, amount, ttl_seconds)


async def test_lost_counters_lose_tokens_but_never_turn_a_refusal_into_an_admission() -> None:
    counters, metrics = FlakyCounters(), Metrics()
    quotas = QuotaService(
        counters, {Role.USER: Limits(daily_queries=1)}, fail_open=True, metrics=metrics
    )
    user = Principal(uuid.uuid4(), Role.USER)
    await quotas.admit_query(user)
    counters.adds_left = 0
    await quotas.add_tokens(user, 100)  # the run was served: its tokens are lost, no error
    counters.adds_left = 1  # the query is counted (over the limit); taking it back fails
    with pytest.raises(ResourceExhausted):
        await quotas.admit_query(user)
    for operation in ("add_tokens", "take_back"):
        assert (
            metrics.registry.get_sample_value(
                "agentmesh_quota_check_failures_total", {"operation": operation}
            )
            == 1
        )
