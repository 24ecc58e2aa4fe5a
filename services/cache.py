"""A small bytes cache with per-entry TTLs: Redis when it is configured (shared by
replicas), else this process's memory. A cache never fails the caller: a Redis error or
timeout is logged and behaves as a miss."""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("agentmesh.cache")


class Cache(Protocol):
    hits: int
    misses: int

    async def get(self, key: str) -> bytes | None:
        """The value stored under `key`, or None when it is missing or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        """Store `value` under `key` for `ttl_seconds`."""
        ...


class InProcessCache:
    """Entries in memory, the least recently used evicted past `max_entries`."""

    def __init__(
        self, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock
        self.hits = 0
        self.misses = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self._clock():
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        self._entries[key] = (value, self._clock() + ttl_seconds)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class RedisCache:
    """Entries in Redis under `prefix`, expired by Redis itself (PX)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self.hits = 0
        self.misses = 0

    async def get(self, key: str) -> bytes | None:
        try:
            raw = await self._redis.get(self._prefix + key)
            value = raw.encode() if isinstance(raw, str) else raw
        except (RedisError, OSError) as error:
            log.warning("cache read failed, computing instead: %s", error)
            value = None
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        try:
            await self._redis.set(self._prefix + key, value, px=max(1, round(ttl_seconds * 1000)))
        except (RedisError, OSError) as error:
            log.warning("cache write failed: %s", error)
