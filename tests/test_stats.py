"""GetSystemStats and GetUserStats against the real server on SQLite and PostgreSQL.

The exact-number tests seed the events table with a known set of events at chosen times
(the API always stamps events with the present) in a range of 1990-91 no other test
touches; the expected numbers below are worked out by hand. Real traffic reaching the
statistics, and the caches, are checked on their own applications."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.analytics.v1 import analytics_pb2 as pb
from agentmesh.analytics.v1 import analytics_service_pb2 as service_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from server.main import Application
from services.db import utcnow
from services.usage_events.models import Event
from tests.backends import Database
from tests.harness import Account, Stubs, new_admin, new_user, running_app
from tests.limited import REDIS_URL, redis_up
from tests.rpc_errors import field_violations
from tests.test_auth import expect_code
from tests.test_rest import call


@pytest.fixture(scope="session")
def analytics(stubs: Stubs) -> analytics_grpc.AnalyticsServiceAsyncStub:
    return analytics_grpc.AnalyticsServiceStub(stubs.channel)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def at(day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    """A moment in the seeded range: days count from Monday 1990-12-31 (day 0)."""
    base = datetime(1990, 12, 31, tzinfo=UTC)
    return (
        base
        + timedelta(days=day, hours=hour, minutes=minute, seconds=second)
        + (timedelta(microseconds=micro))
    )


START, END = at(0), at(8)  # Monday 1990-12-31 to Tuesday 1991-01-08 (exclusive)


async def seed(app: Application, rows: list[dict[str, Any]]) -> None:
    async with app.domain.sessions.begin() as s:
        s.add_all(Event(**row) for row in rows)


def query(
    when: datetime,
    user: uuid.UUID,
    latency: float,
    tokens: tuple[int, int] = (0, 0),
    ok: bool = True,
) -> dict[str, Any]:
    return {
        "occurred_at": when,
        "kind": "agent_query",
        "user_id": user,
        "latency_ms": latency,
        "tokens_in": tokens[0],
        "tokens_out": tokens[1],
        "success": ok,
        "code": None if ok else "LLM_UNAVAILABLE",
    }


def event(when: datetime, kind: str, user: uuid.UUID | None, **fields: Any) -> dict[str, Any]:
    return {"occurred_at": when, "kind": kind, "user_id": user, **fields}


def rpc(when: datetime, user: uuid.UUID | None, code: str) -> dict[str, Any]:
    return event(when, "rpc", user, rpc="/agentmesh.x.v1.S/M", code=code, success=code == "OK")


async def seed_the_range(app: Application, alice: uuid.UUID) -> None:
    bob, carol, dave = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await seed(
        app,
        [
            query(at(0) - timedelta(microseconds=1), alice, 999),  # before the range
            # Day 0 (Monday 1990-12-31): alice and bob.
            query(at(0), alice, 100, (10, 20)),  # the first instant counts
            query(at(0, 10), bob, 300, (5, 5)),
            query(at(0, 11), bob, 50, ok=False),  # failed: no latency percentile
            event(at(0, 12), "tool_call", alice, tool="web_search", code="ok", success=True),
            event(at(0, 12), "tool_call", alice, tool="web_search", code="error", success=False),
            event(at(0, 12), "tool_call", bob, tool="knowledge_search", code="ok", success=True),
            rpc(at(0, 13), alice, "OK"),
            rpc(at(0, 13), bob, "OK"),
            rpc(at(0, 13), bob, "NOT_FOUND"),
            rpc(at(0, 13), None, "INVALID_ARGUMENT"),  # anonymous: no active user
            event(at(0, 23, 59, 59, 999_999), "feedback", alice, code="thumbs_up"),
            # Day 1 (Tuesday 1991-01-01, a new month, the same ISO week).
            event(at(1), "feedback", bob, code="thumbs_down"),
            event(at(1), "registration", carol, success=True),
            event(at(1), "login", carol, success=True),
            event(at(1), "login", carol, success=False),  # a failed login is no login
            query(at(1, 8), carol, 200, (1, 2)),
            query(at(1, 8), alice, 400, (3, 4)),
            event(at(1, 8), "document_upload", alice, success=True),
            event(at(1, 8), "rate_limited", dave, code="user"),
            event(at(1, 8), "quota_refused", alice, code="QUOTA_EXCEEDED"),
            rpc(at(1, 9), carol, "OK"),
            rpc(at(1, 9), carol, "OK"),
            rpc(at(1, 9), dave, "RESOURCE_EXHAUSTED"),
            # Day 7 (Monday 1991-01-07, the next ISO week).
            query(at(7, 9), alice, 1000, (100, 200)),
            rpc(at(7, 9), alice, "INTERNAL"),
            query(END, alice, 5),  # the end is exclusive
        ],
    )


def summary(bucket: pb.StatsBucket) -> dict[str, Any]:
    return {
        "users": bucket.active_users,
        "queries": (bucket.queries, bucket.failed_queries),
        "tokens": (bucket.tokens_in, bucket.tokens_out),
        "latency": (round(bucket.latency_p50_ms, 6), round(bucket.latency_p95_ms, 6)),
        "tools": [(t.tool, t.calls, t.failures) for t in bucket.tool_usage],
        "errors": [(e.code, e.count) for e in bucket.errors],
        "error_rate": round(bucket.error_rate, 6),
        "feedback": (bucket.feedback_count, bucket.feedback_positive_ratio),
        "other": (
            bucket.documents_uploaded,
            bucket.registrations,
            bucket.logins,
            bucket.rate_limited,
            bucket.quota_refused,
        ),
    }


EMPTY = {
    "users": 0,
    "queries": (0, 0),
    "tokens": (0, 0),
    "latency": (0.0, 0.0),
    "tools": [],
    "errors": [],
    "error_rate": 0.0,
    "feedback": (0, 0.0),
    "other": (0, 0, 0, 0, 0),
}
DAY_0 = {
    "users": 2,
    "queries": (3, 1),
    "tokens": (15, 25),
    "latency": (200.0, 290.0),  # 100 and 300: the median between, p95 at 95% of the way
    "tools": [("knowledge_search", 1, 0), ("web_search", 2, 1)],
    "errors": [("INVALID_ARGUMENT", 1), ("NOT_FOUND", 1)],
    "error_rate": 0.5,
    "feedback": (1, 1.0),
    "other": (0, 0, 0, 0, 0),
}
DAY_1 = {
    "users": 4,  # bob, carol, alice, dave
    "queries": (2, 0),
    "tokens": (4, 6),
    "latency": (300.0, 390.0),
    "tools": [],
    "errors": [("RESOURCE_EXHAUSTED", 1)],
    "error_rate": round(1 / 3, 6),
    "feedback": (1, 0.0),
    "other": (1, 1, 1, 1, 1),
}
DAY_7 = {
    **EMPTY,
    "users": 1,
    "queries": (1, 0),
    "tokens": (100, 200),
    "latency": (1000.0, 1000.0),
    "errors": [("INTERNAL", 1)],
    "error_rate": 1.0,
}
TOTALS = {
    "users": 4,
    "queries": (6, 1),
    "tokens": (119, 231),
    # 100 200 300 400 1000: p95 sits 0.8 of the way from 400 to 1000.
    "latency": (300.0, 880.0),
    "tools": [("knowledge_search", 1, 0), ("web_search", 2, 1)],
    "errors": [
        ("INTERNAL", 1),
        ("INVALID_ARGUMENT", 1),
        ("NOT_FOUND", 1),
        ("RESOURCE_EXHAUSTED", 1),
    ],
    "error_rate": 0.5,
    "feedback": (2, 0.5),
    "other": (1, 1, 1, 1, 1),
}


@pytest.fixture(scope="session")
async def seeded(app: Application, stubs: Stubs) -> Account:
    """The seeded range, once per database; alice is a real account (GetUserStats)."""
    alice = await new_user(stubs, "alice")
    await seed_the_range(app, uuid.UUID(alice.user_id))
    return alice


async def system_stats(
    analytics: analytics_grpc.AnalyticsServiceAsyncStub,
    admin: Account,
    granularity: pb.Granularity.ValueType,
) -> service_pb.GetSystemStatsResponse:
    response: service_pb.GetSystemStatsResponse = await analytics.GetSystemStats(
        service_pb.GetSystemStatsRequest(
            start_time=ts(START), end_time=ts(END), granularity=granularity
        ),
        metadata=admin.metadata,
    )
    return response


def spans(response: Any) -> list[tuple[datetime, datetime]]:
    return [
        (b.start_time.ToDatetime(tzinfo=UTC), b.end_time.ToDatetime(tzinfo=UTC))
        for b in response.buckets
    ]


async def test_system_stats_are_exact_by_day(
    app: Application,
    stubs: Stubs,
    seeded: Account,
    analytics: analytics_grpc.AnalyticsServiceAsyncStub,
) -> None:
    admin = await new_admin(app, stubs)
    response = await system_stats(analytics, admin, pb.GRANULARITY_UNSPECIFIED)  # days
    assert spans(response) == [(at(d), at(d + 1)) for d in range(8)]
    assert [summary(b) for b in response.buckets] == [DAY_0, DAY_1, *[EMPTY] * 5, DAY_7]
    assert summary(response.totals) == TOTALS
    assert spans(response)[0][0] == response.totals.start_time.ToDatetime(tzinfo=UTC) == START


async def test_system_stats_are_exact_by_week_and_month(
    app: Application,
    stubs: Stubs,
    seeded: Account,
    analytics: analytics_grpc.AnalyticsServiceAsyncStub,
) -> None:
    admin = await new_admin(app, stubs)
    weeks = await system_stats(analytics, admin, pb.GRANULARITY_WEEK)
    # ISO weeks start on Monday: days 0-6, then the partial week of day 7.
    assert spans(weeks) == [(at(0), at(7)), (at(7), at(8))]
    first_week = summary(weeks.buckets[0])
    assert first_week["users"] == 4 and first_week["queries"] == (5, 1)
    assert first_week["tokens"] == (19, 31)
    assert first_week["latency"] == (250.0, 385.0)  # 100 200 300 400
    assert first_week["errors"] == [
        ("INVALID_ARGUMENT", 1),
        ("NOT_FOUND", 1),
        ("RESOURCE_EXHAUSTED", 1),
    ]
    assert first_week["error_rate"] == round(3 / 7, 6)
    assert summary(weeks.buckets[1]) == DAY_7
    assert summary(weeks.totals) == TOTALS

    months = await system_stats(analytics, admin, pb.GRANULARITY_MONTH)
    # December's last day, then January up to the range's end.
    assert spans(months) == [(at(0), at(1)), (at(1), at(8))]
    assert summary(months.buckets[0]) == DAY_0
    january = summary(months.buckets[1])
    assert january["users"] == 4 and january["queries"] == (3, 0)
    assert january["latency"] == (400.0, 940.0)  # 200 400 1000
    assert january["feedback"] == (1, 0.0) and january["error_rate"] == 0.5
    assert summary(months.totals) == TOTALS


async def test_user_stats_are_one_users_events(
    app: Application,
    stubs: Stubs,
    seeded: Account,
    analytics: analytics_grpc.AnalyticsServiceAsyncStub,
) -> None:
    admin = await new_admin(app, stubs)
    response = await analytics.GetUserStats(
        service_pb.GetUserStatsRequest(
            user_id=seeded.user_id,
            start_time=ts(START),
            end_time=ts(END),
            granularity=pb.GRANULARITY_WEEK,
        ),
        metadata=admin.metadata,
    )
    assert response.user_id == seeded.user_id
    assert summary(response.totals) == {
        "users": 1,
        "queries": (3, 0),
        "tokens": (113, 224),
        "latency": (400.0, 940.0),
        "tools": [("web_search", 2, 1)],
        "errors": [("INTERNAL", 1)],
        "error_rate": 0.5,
        "feedback": (1, 1.0),
        "other": (1, 0, 0, 0, 1),
    }
    assert [b.queries for b in response.buckets] == [2, 1]

    for user_id, code, field in [
        (str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND, None),
        ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
    ]:
        error = await expect_code(
            analytics.GetUserStats(
                service_pb.GetUserStatsRequest(user_id=user_id), metadata=admin.metadata
            ),
            code,
        )
        if field:
            assert field in field_violations(error)


async def test_stats_are_for_administrators(
    stubs: Stubs, analytics: analytics_grpc.AnalyticsServiceAsyncStub
) -> None:
    user = await new_user(stubs)
    await expect_code(
        analytics.GetSystemStats(service_pb.GetSystemStatsRequest(), metadata=user.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_code(
        analytics.GetUserStats(
            service_pb.GetUserStatsRequest(user_id=user.user_id), metadata=user.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_bad_ranges_are_invalid_arguments(
    app: Application, stubs: Stubs, analytics: analytics_grpc.AnalyticsServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    two_years = (datetime(2001, 1, 1, tzinfo=UTC), datetime(2003, 1, 1, tzinfo=UTC))
    cases: list[tuple[service_pb.GetSystemStatsRequest, str]] = [
        (service_pb.GetSystemStatsRequest(start_time=ts(END), end_time=ts(START)), "start_time"),
        (service_pb.GetSystemStatsRequest(start_time=ts(END), end_time=ts(END)), "start_time"),
        # 730 days is more than the 400 buckets a request may hold...
        (
            service_pb.GetSystemStatsRequest(
                start_time=ts(two_years[0]), end_time=ts(two_years[1])
            ),
            "start_time",
        ),
        (service_pb.GetSystemStatsRequest(granularity=99), "granularity"),  # type: ignore[arg-type]
        (
            service_pb.GetSystemStatsRequest(end_time=Timestamp(seconds=10**12)),
            "end_time",
        ),
        (
            service_pb.GetSystemStatsRequest(
                end_time=ts(datetime(9999, 12, 31, 12, tzinfo=UTC)),
                granularity=pb.GRANULARITY_MONTH,
            ),
            "start_time",
        ),
    ]
    for request, field in cases:
        error = await expect_code(
            analytics.GetSystemStats(request, metadata=admin.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert field in field_violations(error), request
    # ...while 24 months are fine.
    months = await analytics.GetSystemStats(
        service_pb.GetSystemStatsRequest(
            start_time=ts(two_years[0]),
            end_time=ts(two_years[1]),
            granularity=pb.GRANULARITY_MONTH,
        ),
        metadata=admin.metadata,
    )
    assert len(months.buckets) == 24


async def test_the_default_range_ends_with_the_current_bucket(
    app: Application, stubs: Stubs, analytics: analytics_grpc.AnalyticsServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    before = utcnow()
    days = await analytics.GetSystemStats(
        service_pb.GetSystemStatsRequest(), metadata=admin.metadata
    )
    after = utcnow()
    assert len(days.buckets) == 30
    last_start, last_end = spans(days)[-1]
    assert last_start <= before and after < last_end == last_start + timedelta(days=1)
    assert last_start.time().isoformat() == "00:00:00"
    months = await analytics.GetSystemStats(
        service_pb.GetSystemStatsRequest(granularity=pb.GRANULARITY_MONTH),
        metadata=admin.metadata,
    )
    assert len(months.buckets) == 12
    assert all(start.day == 1 for start, _ in spans(months))
    assert spans(months)[-1][0] <= before < spans(months)[-1][1]


async def test_system_stats_over_rest(
    app: Application, stubs: Stubs, seeded: Account, rest: aiohttp.ClientSession
) -> None:
    admin = await new_admin(app, stubs)
    path = (
        "/v1/analytics/system?granularity=GRANULARITY_MONTH"
        "&start_time=1990-12-31T00:00:00Z&end_time=1991-01-08T00:00:00Z"
    )
    status, body, _ = await call(rest, "GET", path, token=admin.access_token)
    assert status == 200
    assert [b["start_time"] for b in body["buckets"]] == [
        "1990-12-31T00:00:00Z",
        "1991-01-01T00:00:00Z",
    ]
    assert body["totals"]["queries"] == "6" and body["totals"]["latency_p95_ms"] == 880
    user = await new_user(stubs)
    status, _, _ = await call(rest, "GET", path, token=user.access_token)
    assert status == 403


async def queries_today(
    analytics: analytics_grpc.AnalyticsServiceAsyncStub, admin: Account, user: Account
) -> int:
    response = await analytics.GetUserStats(
        service_pb.GetUserStatsRequest(user_id=user.user_id), metadata=admin.metadata
    )
    return int(response.buckets[-1].queries)


async def eventually(probe: Any, expected: int, limit: float = 30.0) -> None:
    """Poll until `probe()` returns `expected` (the flush interval plus the cache TTL)."""
    async with asyncio.timeout(limit):
        while True:
            if await probe() == expected:
                return
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_stats_are_cached_and_the_current_bucket_refreshes(
    database: Database, tmp_path: Path, store: str
) -> None:
    overrides: dict[str, Any] = {"stats_cache_seconds": 1.0}
    prefix = f"agentmesh-test-{uuid.uuid4().hex}:"
    if store == "redis":
        await redis_up()
        overrides |= {"redis_url": REDIS_URL, "redis_key_prefix": prefix}
    async with running_app(database.url, tmp_path / "data", **overrides) as (app, stubs):
        analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
        admin = await new_admin(app, stubs)
        user = await new_user(stubs)
        uid = uuid.UUID(user.user_id)

        # A closed range is cached for an hour: an event written into it afterwards (which
        # the recorder never does) stays invisible, which shows the answer is the cache's.
        old = datetime(1985, 6, 1, tzinfo=UTC)
        await seed(app, [query(old, uid, 10)])
        request = service_pb.GetUserStatsRequest(
            user_id=user.user_id, start_time=ts(old), end_time=ts(old + timedelta(days=1))
        )
        first = await analytics.GetUserStats(request, metadata=admin.metadata)
        await seed(app, [query(old + timedelta(hours=1), uid, 20)])
        second = await analytics.GetUserStats(request, metadata=admin.metadata)
        assert first.totals.queries == second.totals.queries == 1

        # The current bucket: new queries show within the flush interval plus the 1 s TTL.
        for expected in (1, 2):
            await stubs.agent.Query(agent_pb.QueryRequest(query="hello"), metadata=user.metadata)
            await eventually(lambda: queries_today(analytics, admin, user), expected)

        if store == "redis":
            await queries_today(analytics, admin, user)  # cached for the next second
            redis = Redis.from_url(REDIS_URL)
            try:
                keys = [k.decode() async for k in redis.scan_iter(f"{prefix}cache:*")]
                ttls = {k: await redis.pttl(k) for k in keys}
                await redis.delete(*keys)
            finally:
                await redis.aclose()
            closed = [t for k, t in ttls.items() if "1985-06-01" in k]
            current = [t for k, t in ttls.items() if "1985-06-01" not in k]
            assert len(closed) == 1 and 3_500_000 < closed[0] <= 3_600_000
            assert current and all(0 < t <= 1000 for t in current)
