"""The per-user cap on agent runs in flight: counted in this process, or in Redis so that it
holds across replicas. A Redis slot is a lease the running process renews; a crashed
replica's slots expire on their own within RUN_LEASE_SECONDS."""

import uuid
from collections import Counter
from collections.abc import Collection
from typing import Protocol

from redis.asyncio import Redis

from services.agent.run_log import RUN_LEASE_SECONDS
from services.agent.run_log_redis import reaching_redis

# KEYS[1]: the user's runs, a sorted set of run ids scored by lease expiry (server time, ms).
# ARGV: run id, limit, lease (ms). Expired leases go first; returns 1 when admitted.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# KEYS: users' sets; ARGV: lease (ms), then the run id in each set (same order): extend
# the leases that still exist (XX: a slot already released stays released).
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], lease)
end
return #KEYS
"""


class RunSlots(Protocol):
    async def acquire(self, user_id: uuid.UUID, run_id: str, limit: int) -> bool:
        """Take a slot for `run_id` unless `user_id` already has `limit` runs in flight."""
        ...

    async def release(self, user_id: uuid.UUID, run_id: str) -> None:
        """Give the run's slot back (it ended)."""
        ...

    async def renew(self, slots: Collection[tuple[uuid.UUID, str]]) -> None:
        """Extend the leases of the (user, run) slots this process's runs hold."""
        ...


class InProcessRunSlots:
    """Runs in flight per user in this process (the embedded mode: one process)."""

    def __init__(self) -> None:
        self._running: Counter[uuid.UUID] = Counter()

    async def acquire(self, user_id: uuid.UUID, run_id: str, limit: int) -> bool:
        if self._running[user_id] >= limit:
            return False
        self._running[user_id] += 1
        return True

    async def release(self, user_id: uuid.UUID, run_id: str) -> None:
        self._running[user_id] -= 1
        if self._running[user_id] <= 0:
            del self._running[user_id]

    async def renew(self, slots: Collection[tuple[uuid.UUID, str]]) -> None:
        return None


class RedisRunSlots:
    """Each user's runs in flight as a Redis sorted set of leases, decided atomically by a
    script on the server's clock, so concurrent starts on any replicas never exceed it."""

    def __init__(self, redis: Redis, prefix: str, lease_seconds: float = RUN_LEASE_SECONDS) -> None:
        self._prefix = prefix
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)

    def _key(self, user_id: uuid.UUID) -> str:
        return f"{self._prefix}runs:user:{user_id}"

    async def acquire(self, user_id: uuid.UUID, run_id: str, limit: int) -> bool:
        with reaching_redis():
            admitted = await self._acquire(
                keys=[self._key(user_id)], args=[run_id, limit, self._lease_ms]
            )
        return bool(admitted)

    async def release(self, user_id: uuid.UUID, run_id: str) -> None:
        with reaching_redis():
            await self._redis.zrem(self._key(user_id), run_id)

    async def renew(self, slots: Collection[tuple[uuid.UUID, str]]) -> None:
        if slots:
            await self._renew(
                keys=[self._key(user) for user, _ in slots],
                args=[self._lease_ms, *(run_id for _, run_id in slots)],
            )
