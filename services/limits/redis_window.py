"""Sliding-window-log rate limiting shared by every replica through Redis (needs Redis 5+).

Give the limiter a client with short socket timeouts, so a dead connection is noticed by
the client and not only cut off by `timeout`, and a blocking pool: redis-py's default pool
raises MaxConnectionsError past 100 connections in use, which would admit (fail open) every
call of a larger burst, while a blocking pool makes them wait, still bounded by `timeout`::

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=50, timeout=None, socket_timeout=0.05, socket_connect_timeout=0.05
    )
    limiter = RedisRateLimiter(redis.asyncio.Redis.from_pool(pool), timeout=0.05)
"""

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.limits.window import Check, Decision, check_limit

logger = logging.getLogger("agentmesh.limits")

# KEYS: the keys' logs, sorted sets of admitted calls scored by server time (µs).
# ARGV: window (µs), a member name unique to this call (two calls can share a microsecond,
# and Lua 5.1 prints numbers with 14 digits, so the time cannot name it), one limit per key.
# All or nothing: returns {0, smallest remaining, 0} when every key had room (the call is
# recorded under each), else {1-based index of the first full key, 0, retry_after (µs)}.
# Time comes from the server, so replicas with drifting clocks still share one window;
# microseconds since the epoch (~1.8e15) fit a double's 53-bit mantissa exactly.
_SLIDING_WINDOW_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local window = tonumber(ARGV[1])
local member = ARGV[2]
local counts = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 + i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  if count >= limit then
    local blocking = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
    return {i, 0, tonumber(blocking[2]) + window - now}
  end
  counts[i] = count
end
local remaining = -1
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], math.ceil(window / 1000))
  local left = tonumber(ARGV[2 + i]) - counts[i] - 1
  if remaining < 0 or left < remaining then remaining = left end
end
return {0, remaining, 0}
"""

_MICROSECONDS = 1_000_000


class RedisRateLimiter:
    """A sliding-window log per key in a Redis sorted set, decided by one atomic script.

    When Redis fails or is slower than `timeout`, the call is admitted (`fail_open`, or the
    call's own `fail_open`) or refused for a second, and counted in `failures`; the next
    call tries Redis again.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "agentmesh:rl:",
        timeout: float = 0.05,
        fail_open: bool = True,
        warn_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._script = redis.register_script(_SLIDING_WINDOW_LUA)
        self._prefix = prefix
        self._timeout = timeout
        self._fail_open = fail_open
        self._warn_every = warn_every
        self._clock = clock
        self._last_warning: float | None = None
        # Per-instance nonce + sequence: unique members across replicas and tasks.
        self._nonce = os.urandom(6).hex()
        self._sequence = itertools.count()
        # Decisions made without Redis (either way) since this limiter was created.
        self.failures = 0

    async def hit(self, key: str, limit: int, window_seconds: float) -> Decision:
        """Record a call for `key` if the window has room, and say whether it had."""
        return (await self.hit_all([(key, limit)], window_seconds))[1]

    async def hit_all(
        self, checks: Sequence[Check], window_seconds: float, *, fail_open: bool | None = None
    ) -> tuple[int, Decision]:
        """Record a call under every key if all their windows have room, in one round trip
        (the keys must live on one Redis node: no cluster slots)."""
        for _, limit in checks:
            check_limit(limit, window_seconds)
        window_us = max(1, round(window_seconds * _MICROSECONDS))
        member = f"{self._nonce}:{next(self._sequence)}"
        try:
            async with asyncio.timeout(self._timeout):
                refused_at, remaining, retry_us = await self._script(
                    keys=[self._prefix + key for key, _ in checks],
                    args=[window_us, member, *(limit for _, limit in checks)],
                )
        except (RedisError, OSError) as error:  # TimeoutError is an OSError
            admit = self._fail_open if fail_open is None else fail_open
            return (-1 if admit else 0), self._without_redis(error, admit)
        decision = Decision(
            allowed=not refused_at, remaining=int(remaining), retry_after=retry_us / _MICROSECONDS
        )
        return int(refused_at) - 1, decision

    def _without_redis(self, error: Exception, admit: bool) -> Decision:
        self.failures += 1
        now = self._clock()
        if self._last_warning is None or now - self._last_warning >= self._warn_every:
            self._last_warning = now
            logger.warning(
                "rate limiter cannot reach Redis (%s: %s); %s; %d failures so far",
                type(error).__name__,
                error,
                "admitting the call" if admit else "refusing the call",
                self.failures,
            )
        if admit:
            return Decision(allowed=True, remaining=0, retry_after=0.0, decided=False)
        return Decision(allowed=False, remaining=0, retry_after=1.0, decided=False)
