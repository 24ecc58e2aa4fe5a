"""Infrastructure metrics: the database pool, whether each configured dependency answers,
cache hits, usage events lost and event-loop lag."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.audit.trail import AuditTrail
from services.db import PoolStats
from services.knowledge.ingestion import QueueStats
from services.limits import RateLimiter
from services.usage_events.recorder import EventRecorder

log = logging.getLogger("agentmesh.metrics")

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
Probe = Callable[[], Awaitable[object]]
QueueSampler = Callable[[], Awaitable[QueueStats]]


class PoolCollector(Collector):
    """The database connection pool, read at scrape time through `read`."""

    def __init__(self, read: Callable[[], PoolStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self._read()
        states = GaugeMetricFamily(
            "agentmesh_db_pool_connections", "Database connections by state.", labels=["state"]
        )
        states.add_metric(["in_use"], pool.in_use)
        states.add_metric(["idle"], pool.idle)
        states.add_metric(["overflow"], pool.overflow)
        yield states
        yield GaugeMetricFamily("agentmesh_db_pool_size", "The pool's base size.", value=pool.size)


class HitCounts(Protocol):
    """A cache that counts its lookups."""

    hits: int
    misses: int


class CountersCollector(Collector):
    """Counts kept by the caches, the event recorder, the rate limiter and the audit
    trail, exposed as counters."""

    def __init__(
        self,
        caches: dict[str, HitCounts],
        events: EventRecorder,
        limiter: RateLimiter,
        audit: AuditTrail,
    ) -> None:
        self._caches = caches
        self._events = events
        self._limiter = limiter
        self._audit = audit

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "agentmesh_cache_requests",
            "Cache lookups by cache and result.",
            labels=["cache", "result"],
        )
        for name, cache in self._caches.items():
            requests.add_metric([name, "hit"], cache.hits)
            requests.add_metric([name, "miss"], cache.misses)
        yield requests
        yield CounterMetricFamily(
            "agentmesh_events_dropped",
            "Usage events lost (the buffer was full while the database was unreachable).",
            value=self._events.dropped,
        )
        yield CounterMetricFamily(
            "agentmesh_rate_limit_decision_failures",
            "Rate-limit decisions the limiter could not make (Redis unreachable or too slow);"
            " each was admitted or refused by RATE_LIMIT_FAIL_OPEN.",
            value=self._limiter.failures,
        )
        yield CounterMetricFamily(
            "agentmesh_audit_write_failures",
            "Audit records that could not be written (the database failed); each is logged.",
            value=self._audit.failed_writes,
        )


class RuntimeMonitor:
    """Background probes: each configured dependency every `interval` seconds (1 when it
    answers within `timeout`, else 0), the ingestion queue as often, and how late the
    event loop wakes up."""

    def __init__(
        self,
        registry: CollectorRegistry,
        probes: dict[str, Probe],
        queue: QueueSampler | None = None,
        *,
        on_probed: Callable[[dict[str, bool]], Awaitable[None]] | None = None,
        interval: float = 10.0,
        timeout: float = 2.0,
        lag_interval: float = 0.5,
    ) -> None:
        self._probes = probes
        self._on_probed = on_probed  # told each round's results (the health follows them)
        self._interval = interval
        self._timeout = timeout
        self._lag_interval = lag_interval
        self._up = Gauge(
            "agentmesh_dependency_up",
            "1 when the dependency answered its last probe, else 0 (configured ones only).",
            ["dependency"],
            registry=registry,
        )
        self._lag = Histogram(
            "agentmesh_event_loop_lag_seconds",
            "How much later than asked the event loop ran a timer.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._queue = queue
        self._jobs = Gauge(
            "agentmesh_ingestion_jobs",
            "Ingestion jobs by state: waiting, running, retrying (waiting again after a failed "
            "or interrupted run), failed (out of attempts).",
            ["state"],
            registry=registry,
        )
        self._oldest = Gauge(
            "agentmesh_ingestion_oldest_job_seconds",
            "How long the oldest waiting ingestion job has waited (0 when none waits).",
            registry=registry,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.probe_all()
        self._tasks = [
            asyncio.create_task(self._probe_forever(), name="dependency-probes"),
            asyncio.create_task(self._measure_lag(), name="event-loop-lag"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def probe_all(self) -> None:
        names = list(self._probes)
        results = await asyncio.gather(*(self._probe(self._probes[n]) for n in names))
        for name, up in zip(names, results, strict=True):
            self._up.labels(name).set(1 if up else 0)
        if self._on_probed is not None:
            await self._on_probed(dict(zip(names, results, strict=True)))
        if self._queue is not None:
            await self._sample_queue(self._queue)

    async def _sample_queue(self, sample: QueueSampler) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                stats = await sample()
        except Exception as error:  # the database probe reports the outage itself
            log.warning("ingestion queue sample failed: %s: %s", type(error).__name__, error)
            return
        for state in ("waiting", "running", "retrying", "failed"):
            self._jobs.labels(state).set(getattr(stats, state))
        self._oldest.set(stats.oldest_waiting_seconds)

    async def _probe(self, probe: Probe) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await probe()
        except Exception as error:  # any failure means "down"; the reason is logged
            log.warning("dependency probe failed: %s: %s", type(error).__name__, error)
            return False
        return True

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe_all()

    async def _measure_lag(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self._lag_interval)
            self._lag.observe(max(0.0, time.perf_counter() - asked - self._lag_interval))
