"""Counters that expire, shared through Redis or kept in process, behind one interface."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

T = TypeVar("T")


class CountersUnavailable(Exception):
    """The counters could not be read or changed (their store is unreachable or too slow)."""


class Counters(Protocol):
    async def add(self, key: str, amount: int, ttl_seconds: int) -> int:
        """Add `amount` to `key` (created at 0, expiring after `ttl_seconds`); the new value."""
        ...

    async def read(self, keys: list[str]) -> list[int]:
        """The values of `keys` (0 for a missing or expired key)."""
        ...


class InProcessCounters:
    """Counters in this process's memory (the embedded mode)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[int, float]] = {}

    def _live(self, key: str) -> int:
        value = self._values.get(key)
        if value is None:
            return 0
        if value[1] <= self._clock():
            del self._values[key]
            return 0
        return value[0]

    async def add(self, key: str, amount: int, ttl_seconds: int) -> int:
        current = self._live(key)
        expires = self._values[key][1] if key in self._values else self._clock() + ttl_seconds
        self._values[key] = (current + amount, expires)
        return current + amount

    async def read(self, keys: list[str]) -> list[int]:
        return [self._live(key) for key in keys]


class RedisCounters:
    """Counters in Redis: INCRBY is atomic, so concurrent requests never lose a count. A call
    that fails or takes longer than `timeout` raises CountersUnavailable."""

    def __init__(self, redis: Redis, prefix: str, timeout: float = 1.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout = timeout

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await work()
        except (RedisError, OSError) as error:  # TimeoutError is an OSError
            raise CountersUnavailable(f"{type(error).__name__}: {error}") from error

    async def add(self, key: str, amount: int, ttl_seconds: int) -> int:
        async def incrby() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(self._prefix + key, amount)
                pipe.expire(self._prefix + key, ttl_seconds, nx=True)
                value, _ = await pipe.execute()
            return int(value)

        return await self._call(incrby)

    async def read(self, keys: list[str]) -> list[int]:
        values = await self._call(lambda: self._redis.mget([self._prefix + key for key in keys]))
        return [int(v) if v is not None else 0 for v in values]
