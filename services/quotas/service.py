"""Quotas: agent queries and tokens per user per UTC day and calendar month, with limits
per role (0 means unlimited). A query is admitted by counting it first and taking the count
back when that went over a limit, so concurrent queries can never exceed it; tokens are
added when a run completes, so the run that crosses a token limit finishes and the next is
refused.

When the counters cannot be reached (Redis down or too slow), a query is admitted uncounted
(`fail_open`) or refused UNAVAILABLE; either way the failure is counted in
`agentmesh_quota_check_failures_total`. A completed run's tokens that cannot be added are
lost (the run has been served), and quota status cannot be reported (UNAVAILABLE)."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.auth.principal import Principal, Role
from services.db import utcnow
from services.errors import QuotaViolation, ResourceExhausted, Unavailable
from services.metrics import Metrics
from services.periods import Window, window_bounds
from services.quotas.counters import Counters, CountersUnavailable

log = logging.getLogger("agentmesh.quotas")

# The periods quotas count in and reset on.
PERIODS = (Window.DAY, Window.MONTH)
# At most one warning this often while the counters keep failing.
WARN_EVERY_SECONDS = 30.0


@dataclass(frozen=True)
class Limits:
    """One role's limits; 0 is unlimited."""

    daily_queries: int = 0
    monthly_queries: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0

    def queries(self, period: Window) -> int:
        return self.daily_queries if period is Window.DAY else self.monthly_queries

    def tokens(self, period: Window) -> int:
        return self.daily_tokens if period is Window.DAY else self.monthly_tokens


def _until_end(now: datetime, end: datetime) -> int:
    """A counter's lifetime: to the end of its period, and an hour beyond for clock skew."""
    return int((end - now).total_seconds()) + 3600


@dataclass(frozen=True)
class Allowance:
    """A limit (0 with `unlimited`) and how much of it is used."""

    limit: int
    used: int

    @property
    def unlimited(self) -> bool:
        return self.limit == 0

    @property
    def remaining(self) -> int:
        return 0 if self.unlimited else max(self.limit - self.used, 0)


@dataclass(frozen=True)
class QuotaStatus(Allowance):
    """One quota of a user: its limit, use and reset in this period."""

    metric: str  # "queries" | "tokens"
    period: Window
    resets_at: datetime


class QuotaService:
    def __init__(
        self,
        counters: Counters,
        limits: dict[Role, Limits],
        clock: Callable[[], datetime] = utcnow,
        *,
        fail_open: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._counters = counters
        self._limits = limits
        self._clock = clock
        self._fail_open = fail_open
        self._metrics = metrics
        self._last_warning: float | None = None

    def limits_for(self, principal: Principal) -> Limits:
        return self._limits.get(principal.role, Limits())

    def _key(self, principal: Principal, metric: str, period: Window, start: datetime) -> str:
        stamp = start.strftime("%Y-%m-%d" if period is Window.DAY else "%Y-%m")
        return f"quota:{principal.user_id}:{metric}:{stamp}"

    async def admit_query(self, principal: Principal) -> None:
        """Count one agent query, or refuse it (RESOURCE_EXHAUSTED, QuotaFailure, RetryInfo)
        when a query or token limit of the day or month is used up; without counters, admit
        it or refuse it UNAVAILABLE by `fail_open`."""
        try:
            await self._admit(principal)
        except CountersUnavailable as error:
            self._failed("admit", error)
            if not self._fail_open:
                raise _unavailable() from error

    async def _admit(self, principal: Principal) -> None:
        limits, now = self.limits_for(principal), self._clock()
        for period in PERIODS:
            start, end = window_bounds(period, now)
            token_limit = limits.tokens(period)
            if token_limit:
                [used] = await self._counters.read([self._key(principal, "tokens", period, start)])
                if used >= token_limit:
                    raise _exhausted(principal, "tokens", period, token_limit, end - now)
        counted: list[tuple[str, int]] = []
        try:
            for period in PERIODS:
                start, end = window_bounds(period, now)
                limit = limits.queries(period)
                key = self._key(principal, "queries", period, start)
                ttl = _until_end(now, end)
                value = await self._counters.add(key, 1, ttl)  # counted even when unlimited
                counted.append((key, ttl))
                if limit and value > limit:
                    raise _exhausted(principal, "queries", period, limit, end - now)
        except ResourceExhausted:
            await self._take_back(counted)
            raise

    async def _take_back(self, counted: list[tuple[str, int]]) -> None:
        """Uncount a refused query (it uses up nothing); the refusal stands if this fails."""
        try:
            for key, ttl in counted:
                await self._counters.add(key, -1, ttl)
        except CountersUnavailable as error:
            self._failed("take_back", error)

    async def status(self, principal: Principal) -> list[QuotaStatus]:
        """Every quota of the caller with its use in the current day and month; UNAVAILABLE
        without counters."""
        try:
            return await self._status(principal)
        except CountersUnavailable as error:
            self._failed("status", error)
            raise _unavailable() from error

    async def _status(self, principal: Principal) -> list[QuotaStatus]:
        limits, now = self.limits_for(principal), self._clock()
        found = []
        for metric in ("queries", "tokens"):
            for period in PERIODS:
                start, end = window_bounds(period, now)
                [used] = await self._counters.read([self._key(principal, metric, period, start)])
                limit = limits.queries(period) if metric == "queries" else limits.tokens(period)
                found.append(QuotaStatus(limit, used, metric=metric, period=period, resets_at=end))
        return found

    async def add_tokens(self, principal: Principal, tokens: int) -> None:
        """Count the tokens a completed run used (lost, and counted as a failure, without
        counters: the run has been served either way)."""
        now = self._clock()
        if tokens <= 0:
            return
        try:
            for period in PERIODS:
                start, end = window_bounds(period, now)
                ttl = _until_end(now, end)
                key = self._key(principal, "tokens", period, start)
                await self._counters.add(key, tokens, ttl)
        except CountersUnavailable as error:
            self._failed("add_tokens", error)

    def _failed(self, operation: str, error: CountersUnavailable) -> None:
        """Count a quota operation the counters failed, warning now and then."""
        if self._metrics is not None:
            self._metrics.quota_check_failures.labels(operation).inc()
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning(
                "quota counters unavailable (%s) in %s; %s",
                error,
                operation,
                "admitting queries" if self._fail_open else "refusing queries",
            )


def _unavailable() -> Unavailable:
    return Unavailable("quotas cannot be checked now; try again", reason="QUOTA_UNAVAILABLE")


def _exhausted(
    principal: Principal, metric: str, period: Window, limit: int, until_reset: timedelta
) -> ResourceExhausted:
    what = f"{period} agent {metric}"
    return ResourceExhausted(
        f"quota used up: {limit} {what}",
        retry_after=until_reset.total_seconds(),
        violations=[QuotaViolation(f"user:{principal.user_id}", f"{limit} {what}")],
        reason="QUOTA_EXCEEDED",
        metadata={"metric": metric, "period": period.value},
    )
