"""Counters that expire, shared through Redis or kept in process, behind one interface."""

import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis


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
    """Counters in Redis: INCRBY is atomic, so concurrent requests never lose a count."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def add(self, key: str, amount: int, ttl_seconds: int) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(self._prefix + key, amount)
            pipe.expire(self._prefix + key, ttl_seconds, nx=True)
            value, _ = await pipe.execute()
        return int(value)

    async def read(self, keys: list[str]) -> list[int]:
        values = await self._redis.mget([self._prefix + key for key in keys])
        return [int(v) if v is not None else 0 for v in values]
