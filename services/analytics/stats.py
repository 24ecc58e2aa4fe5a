"""Installation-wide and per-user statistics over calendar buckets, computed in the
database from the events table and cached.

Every figure is one SQL GROUP BY over the events joined to a VALUES list of the buckets
(the whole range rides along as one more bucket, so distinct users and percentiles of the
totals are exact rather than summed). The same statements run on SQLite and PostgreSQL:
percentiles are linear interpolation between the two closest ranks (PostgreSQL's
`percentile_cont`, numpy's default), taken with window functions and integer arithmetic
that both databases evaluate alike.

Caching: a range that ended more than `settle_seconds` ago cannot change any more (events
reach the table within the recorder's flush interval), so it is kept for `closed_ttl`; a
range that holds the present is kept for `open_ttl`, which bounds how stale the current
bucket can be (plus the recorder's flush interval).
"""

import itertools
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, Select, and_, case, column, func, select, values
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.auth.models import User
from services.cache import Cache
from services.db import UTCDateTime, require_uuid, utcnow
from services.errors import InvalidArgument, NotFound
from services.periods import Window, periods, previous_start, window_bounds
from services.usage_events.models import Event
from services.usage_events.recorder import EventKind

# How many buckets a range holds when its start is not given, by bucket width.
DEFAULT_BUCKETS = {Window.DAY: 30, Window.WEEK: 12, Window.MONTH: 12}
PERCENTILES = (50, 95)
TOTALS = -1  # the bucket index of the whole range


@dataclass(frozen=True)
class StatsSettings:
    max_buckets: int = 400
    open_ttl: float = 30.0
    closed_ttl: float = 3600.0
    settle_seconds: float = 60.0


@dataclass(frozen=True)
class StatsRequest:
    window: Window = Window.DAY
    start: datetime | None = None
    end: datetime | None = None
    user_id: str | None = None  # None: the whole installation


@dataclass
class ToolCount:
    tool: str
    calls: int
    failures: int


@dataclass
class Bucket:
    start: datetime
    end: datetime
    active_users: int = 0
    queries: int = 0
    failed_queries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    tool_usage: list[ToolCount] = field(default_factory=list)
    rpcs: int = 0
    failed_rpcs: int = 0
    errors: list[tuple[str, int]] = field(default_factory=list)
    feedback_count: int = 0
    feedback_positive: int = 0
    documents_uploaded: int = 0
    registrations: int = 0
    logins: int = 0
    rate_limited: int = 0
    quota_refused: int = 0

    @property
    def error_rate(self) -> float:
        return self.failed_rpcs / self.rpcs if self.rpcs else 0.0

    @property
    def feedback_positive_ratio(self) -> float:
        return self.feedback_positive / self.feedback_count if self.feedback_count else 0.0


@dataclass
class Stats:
    window: Window
    user_id: uuid.UUID | None
    buckets: list[Bucket]
    totals: Bucket


class StatsService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        cache: Cache,
        settings: StatsSettings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._cache = cache
        self._settings = settings
        self._clock = clock

    @property
    def cache(self) -> Cache:
        return self._cache

    async def stats(self, request: StatsRequest) -> Stats:
        """The statistics of `request`'s range in buckets, oldest first, and as a whole."""
        user_id = await self._user(request.user_id)
        now = self._clock()
        try:
            ranges = self._buckets(request, now)
        except OverflowError:  # a bucket boundary beyond year 9999 or before year 1
            raise InvalidArgument.of("start_time", "the range is out of bounds") from None
        start, end = ranges[0][0], ranges[-1][1]
        key = _cache_key(request.window, user_id, start, end)
        cached = await self._cache.get(key)
        if cached is not None:
            return _decode(cached)
        stats = await self._compute(request.window, user_id, ranges)
        closed = end <= now - timedelta(seconds=self._settings.settle_seconds)
        ttl = self._settings.closed_ttl if closed else self._settings.open_ttl
        await self._cache.set(key, _encode(stats), ttl)
        return stats

    async def _user(self, raw: str | None) -> uuid.UUID | None:
        if raw is None:
            return None
        user_id = require_uuid(raw, field="user_id")
        async with self._sessions() as s:
            if await s.get(User, user_id) is None:
                raise NotFound(f"user {raw} not found")
        return user_id

    def _buckets(self, request: StatsRequest, now: datetime) -> list[tuple[datetime, datetime]]:
        """The requested range with its defaults (up to the end of the current bucket, and
        back DEFAULT_BUCKETS buckets) cut into buckets; INVALID_ARGUMENT if the range is
        inverted or holds more than `max_buckets`."""
        window, limit = request.window, self._settings.max_buckets
        end = request.end or window_bounds(window, now)[1]
        start = request.start
        if start is None:
            start = end
            for _ in range(DEFAULT_BUCKETS[window]):
                start = previous_start(window, start)
        if start >= end:
            raise InvalidArgument.of("start_time", "must be before end_time")
        ranges = list(itertools.islice(periods(window, start, end), limit + 1))
        if len(ranges) > limit:
            raise InvalidArgument.of(
                "start_time",
                f"the range holds more than {limit} {window.value} buckets; "
                "shorten it or use a wider granularity",
            )
        return ranges

    async def _compute(
        self, window: Window, user_id: uuid.UUID | None, ranges: list[tuple[datetime, datetime]]
    ) -> Stats:
        buckets = {i: Bucket(s, e) for i, (s, e) in enumerate(ranges)}
        buckets[TOTALS] = Bucket(ranges[0][0], ranges[-1][1])
        table = (
            values(
                column("idx", Integer),
                column("b_start", UTCDateTime()),
                column("b_end", UTCDateTime()),
                name="buckets",
            )
            .data([(i, b.start, b.end) for i, b in buckets.items()])
            .cte("buckets")
        )
        joined = and_(Event.occurred_at >= table.c.b_start, Event.occurred_at < table.c.b_end)
        scope = [Event.user_id == user_id] if user_id is not None else []

        def over(*columns: Any) -> Select[Any]:
            return select(table.c.idx, *columns).select_from(Event).join(table, joined)

        async with self._sessions() as s:
            for row in await s.execute(over(*_COUNTS).where(*scope).group_by(table.c.idx)):
                _fill(buckets[row[0]], row[1:])
            for idx, p50, p95 in await s.execute(_percentiles(over, table.c.idx, scope)):
                buckets[idx].latency_p50_ms = float(p50)
                buckets[idx].latency_p95_ms = float(p95)
            tools = over(Event.tool, func.count(), _sum(Event.success.is_(False)))
            tools = tools.where(Event.kind == EventKind.TOOL_CALL.value, *scope)
            for idx, tool, calls, failures in await s.execute(
                tools.group_by(table.c.idx, Event.tool).order_by(table.c.idx, Event.tool)
            ):
                buckets[idx].tool_usage.append(ToolCount(str(tool), calls, int(failures)))
            errors = over(Event.code, func.count()).where(
                Event.kind == EventKind.RPC.value, Event.code != "OK", *scope
            )
            for idx, code, count in await s.execute(
                errors.group_by(table.c.idx, Event.code).order_by(table.c.idx, Event.code)
            ):
                buckets[idx].errors.append((str(code), count))
        for bucket in buckets.values():
            bucket.errors.sort(key=lambda item: (-item[1], item[0]))
        totals = buckets.pop(TOTALS)
        return Stats(window, user_id, [buckets[i] for i in range(len(ranges))], totals)


def _kind(kind: EventKind) -> Any:
    return Event.kind == kind.value


def _sum(condition: Any, value: Any = 1) -> Any:
    return func.coalesce(func.sum(case((condition, value), else_=0)), 0)


_QUERY = _kind(EventKind.AGENT_QUERY)
_RPC = _kind(EventKind.RPC)
_FEEDBACK = _kind(EventKind.FEEDBACK)
# Bucket fields filled from one GROUP BY, in the order of _COUNTS.
_COUNTED = (
    "active_users",
    "queries",
    "failed_queries",
    "tokens_in",
    "tokens_out",
    "rpcs",
    "failed_rpcs",
    "feedback_count",
    "feedback_positive",
    "documents_uploaded",
    "registrations",
    "logins",
    "rate_limited",
    "quota_refused",
)
_COUNTS = (
    func.count(Event.user_id.distinct()),
    _sum(_QUERY),
    _sum(and_(_QUERY, Event.success.is_(False))),
    _sum(_QUERY, Event.tokens_in),
    _sum(_QUERY, Event.tokens_out),
    _sum(_RPC),
    _sum(and_(_RPC, Event.code != "OK")),
    _sum(_FEEDBACK),
    _sum(and_(_FEEDBACK, Event.code == "thumbs_up")),
    _sum(_kind(EventKind.DOCUMENT_UPLOAD)),
    _sum(and_(_kind(EventKind.REGISTRATION), Event.success.is_(True))),
    _sum(and_(_kind(EventKind.LOGIN), Event.success.is_(True))),
    _sum(_kind(EventKind.RATE_LIMITED)),
    _sum(_kind(EventKind.QUOTA_REFUSED)),
)


def _fill(bucket: Bucket, counts: Sequence[Any]) -> None:
    for name, value in zip(_COUNTED, counts, strict=True):
        setattr(bucket, name, int(value or 0))


def _percentiles(over: Callable[..., Select[Any]], bucket: Any, scope: list[Any]) -> Select[Any]:
    """p50 and p95 of the latency of completed agent queries per bucket. Rank r (from 0)
    of n sorted values sits at position p/100 * (n - 1); its integer part and remainder are
    taken with integer division so that SQLite and PostgreSQL agree."""
    ranked = (
        over(
            Event.latency_ms.label("v"),
            (func.row_number().over(partition_by=bucket, order_by=Event.latency_ms) - 1).label(
                "rn"
            ),
            func.count().over(partition_by=bucket).label("n"),
        )
        .where(_QUERY, Event.success.is_(True), Event.latency_ms.is_not(None), *scope)
        .subquery()
    )
    picks = []
    for p in PERCENTILES:
        scaled = (ranked.c.n - 1) * p
        low_rank = scaled // 100
        fraction = (scaled % 100) / 100.0
        low = func.max(case((ranked.c.rn == low_rank, ranked.c.v)))
        high = func.coalesce(func.max(case((ranked.c.rn == low_rank + 1, ranked.c.v))), low)
        picks.append(low + (high - low) * fraction)
    return select(ranked.c.idx, *picks).group_by(ranked.c.idx, ranked.c.n)


def _cache_key(window: Window, user_id: uuid.UUID | None, start: datetime, end: datetime) -> str:
    scope = f"user:{user_id}" if user_id else "system"
    return f"stats:v1:{scope}:{window.value}:{start.isoformat()}:{end.isoformat()}"


def _encode(stats: Stats) -> bytes:
    return json.dumps(asdict(stats), default=str).encode()


def _decode(raw: bytes) -> Stats:
    data = json.loads(raw)

    def bucket(item: dict[str, Any]) -> Bucket:
        item["start"] = datetime.fromisoformat(item["start"])
        item["end"] = datetime.fromisoformat(item["end"])
        item["tool_usage"] = [ToolCount(**t) for t in item["tool_usage"]]
        item["errors"] = [(code, count) for code, count in item["errors"]]
        return Bucket(**item)

    return Stats(
        window=Window(data["window"]),
        user_id=uuid.UUID(data["user_id"]) if data["user_id"] else None,
        buckets=[bucket(b) for b in data["buckets"]],
        totals=bucket(data["totals"]),
    )
