"""Rate limiters: exact sliding windows in process and against the real Redis.

Redis comes from AGENTMESH_TEST_REDIS_URL (default: the local server these machines run).
Without it the Redis tests skip, except under CI=true, where they fail.
"""

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from services.limits import Decision, InProcessRateLimiter, RateLimiter, RedisRateLimiter
from tests.backends import require_service
from tests.tcp_proxy import TcpProxy

REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IMPLEMENTATIONS = ["in_process", "redis"]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_port() -> int:
    """A local port nothing listens on (bound once by us, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    # A blocking pool, as the limiter's docs advise: a burst waits for a connection
    # instead of failing (and failing open) past the default pool's 100.
    pool = BlockingConnectionPool.from_url(
        REDIS_URL, max_connections=20, timeout=None, socket_timeout=2, socket_connect_timeout=2
    )
    client = Redis.from_pool(pool)
    try:
        async with asyncio.timeout(3):
            await client.ping()
    except (RedisError, OSError):
        await client.aclose()
        require_service(f"Redis is not reachable at {REDIS_URL}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: Redis) -> AsyncIterator[str]:
    """A key prefix only this test uses; its keys are deleted afterwards."""
    own = f"agentmesh:test:rl:{uuid.uuid4().hex}:"
    yield own
    keys = [key async for key in redis_client.scan_iter(match=f"{own}*")]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture(params=IMPLEMENTATIONS)
def limiter(request: pytest.FixtureRequest) -> RateLimiter:
    if request.param == "in_process":
        return InProcessRateLimiter()
    client: Redis = request.getfixturevalue("redis_client")
    # A generous timeout: these tests are about the window, not about slow machines.
    return RedisRateLimiter(client, prefix=request.getfixturevalue("prefix"), timeout=2.0)


async def test_concurrent_calls_admit_exactly_the_limit(limiter: RateLimiter) -> None:
    decisions = await asyncio.gather(*(limiter.hit("burst", 50, 60) for _ in range(200)))
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 50
    assert getattr(limiter, "failures", 0) == 0  # not admitted by failing open
    assert sorted(d.remaining for d in admitted) == list(range(50))
    assert all(0 < d.retry_after <= 60 for d in decisions if not d.allowed)


async def test_different_keys_are_independent(limiter: RateLimiter) -> None:
    assert (await limiter.hit("user:a", 1, 60)).allowed
    assert not (await limiter.hit("user:a", 1, 60)).allowed
    assert (await limiter.hit("user:b", 1, 60)).allowed
    assert not (await limiter.hit("user:b", 1, 60)).allowed


async def test_several_windows_admit_all_or_nothing(limiter: RateLimiter) -> None:
    ip, user = f"ip-{uuid.uuid4().hex}", f"user-{uuid.uuid4().hex}"
    assert await limiter.hit_all([(ip, 3), (user, 1)], 60) == (-1, Decision(True, 0, 0.0))
    refused_at, decision = await limiter.hit_all([(ip, 3), (user, 1)], 60)
    assert refused_at == 1 and not decision.allowed and 0 < decision.retry_after <= 60
    # The refused call was not counted under the IP either: two of its three are left.
    assert await limiter.hit_all([(ip, 3)], 60) == (-1, Decision(True, 1, 0.0))
    assert await limiter.hit_all([(ip, 3)], 60) == (-1, Decision(True, 0, 0.0))
    assert (await limiter.hit_all([(ip, 3)], 60))[0] == 0


async def test_nonsense_limits_are_rejected(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        await limiter.hit("k", 0, 60)
    with pytest.raises(ValueError):
        await limiter.hit("k", 1, 0)


async def test_in_process_window_slides() -> None:
    clock = FakeClock()
    limiter = InProcessRateLimiter(clock=clock)

    async def hit_at(offset: float) -> Decision:
        clock.now = 1000.0 + offset
        return await limiter.hit("k", 3, 10)

    assert [(await hit_at(t)).remaining for t in (0, 1, 2)] == [2, 1, 0]
    assert await hit_at(3) == Decision(allowed=False, remaining=0, retry_after=7.0)
    assert not (await hit_at(9.99)).allowed
    # The call at 0 leaves the window at 10; the refused calls were never recorded.
    assert await hit_at(10) == Decision(allowed=True, remaining=0, retry_after=0.0)
    assert await hit_at(10.5) == Decision(allowed=False, remaining=0, retry_after=0.5)


async def test_in_process_forgets_keys_whose_window_passed() -> None:
    clock = FakeClock()
    limiter = InProcessRateLimiter(clock=clock)
    for n in range(100):
        await limiter.hit(f"user:{n}", 5, 10)
    assert len(limiter) == 100
    clock.now += 10
    await limiter.hit("user:new", 5, 10)
    assert len(limiter) == 1


async def test_in_process_key_cap_evicts_the_least_recently_used_key() -> None:
    limiter = InProcessRateLimiter(max_keys=2)
    assert (await limiter.hit("a", 1, 60)).allowed
    assert (await limiter.hit("b", 1, 60)).allowed
    assert not (await limiter.hit("a", 1, 60)).allowed  # a is now the most recent
    assert (await limiter.hit("c", 1, 60)).allowed  # evicts b
    assert len(limiter) == 2
    assert not (await limiter.hit("a", 1, 60)).allowed  # a survived, still full
    assert (await limiter.hit("b", 1, 60)).allowed  # b was forgotten, so it starts afresh


async def test_redis_window_slides(redis_client: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_client, prefix=prefix, timeout=2.0)
    assert (await limiter.hit("k", 2, 1.0)).allowed
    assert (await limiter.hit("k", 2, 1.0)).allowed
    refused = await limiter.hit("k", 2, 1.0)
    assert not refused.allowed
    assert 0 < refused.retry_after <= 1.0
    await asyncio.sleep(refused.retry_after + 0.05)
    assert (await limiter.hit("k", 2, 1.0)).allowed
    # The log expires with its window, so idle keys do not linger in Redis.
    assert 0 < await redis_client.pttl(f"{prefix}k") <= 1000


async def unreachable_limiter(port: int, *, fail_open: bool, clock: FakeClock) -> RedisRateLimiter:
    client = Redis(host="127.0.0.1", port=port, socket_timeout=0.05, socket_connect_timeout=0.05)
    return RedisRateLimiter(client, timeout=0.05, fail_open=fail_open, clock=clock)


async def timed_hit(limiter: RedisRateLimiter) -> Decision:
    started = time.monotonic()
    decision = await limiter.hit("k", 5, 60)
    # Bounded by `timeout`; the slack is for slow machines, a hang would take seconds.
    assert time.monotonic() - started < 1.0
    return decision


async def test_unreachable_redis_fails_open_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = await unreachable_limiter(closed_port(), fail_open=True, clock=clock)
    with caplog.at_level(logging.WARNING, logger="agentmesh.limits"):
        for _ in range(3):
            assert (await timed_hit(limiter)).allowed
        clock.now += 30
        assert (await timed_hit(limiter)).allowed
    assert limiter.failures == 4
    # One warning per 30 s, however many calls fail in between.
    assert len([r for r in caplog.records if r.name == "agentmesh.limits"]) == 2


async def test_unreachable_redis_fails_closed() -> None:
    limiter = await unreachable_limiter(closed_port(), fail_open=False, clock=FakeClock())
    assert await timed_hit(limiter) == Decision(
        allowed=False, remaining=0, retry_after=1.0, decided=False
    )
    assert limiter.failures == 1


async def test_a_call_can_choose_its_own_fail_mode() -> None:
    # The credential RPCs fail closed while everything else fails open, on one limiter.
    limiter = await unreachable_limiter(closed_port(), fail_open=True, clock=FakeClock())
    assert await limiter.hit_all([("k", 5)], 60, fail_open=False) == (
        0,
        Decision(allowed=False, remaining=0, retry_after=1.0, decided=False),
    )
    assert (await limiter.hit_all([("k", 5)], 60))[1].allowed
    closed = await unreachable_limiter(closed_port(), fail_open=False, clock=FakeClock())
    assert (await closed.hit_all([("k", 5)], 60, fail_open=True))[1].allowed
    assert limiter.failures == 2 and closed.failures == 1


async def test_silent_redis_is_cut_off_by_the_timeout() -> None:
    # Accepts connections and never answers: only the limiter's own timeout can end a call.
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    try:
        port = silent.sockets[0].getsockname()[1]
        limiter = await unreachable_limiter(port, fail_open=False, clock=FakeClock())
        assert not (await timed_hit(limiter)).allowed
    finally:
        silent.close()
        await silent.wait_closed()


async def test_limiter_recovers_when_redis_comes_back(redis_client: Redis, prefix: str) -> None:
    target = urlsplit(REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    client = Redis(
        host="127.0.0.1", port=proxy.port, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    limiter = RedisRateLimiter(client, prefix=prefix, timeout=0.5, fail_open=False)
    try:
        assert (await limiter.hit("k", 10, 60)).allowed
        await proxy.stop()
        assert not (await limiter.hit("k", 10, 60)).allowed
        assert limiter.failures == 1
        await proxy.start()
        # The very next call reaches Redis again: admitted, recorded, no new failure.
        assert (await limiter.hit("k", 10, 60)) == Decision(True, 8, 0.0)
        assert limiter.failures == 1
        assert await redis_client.zcard(f"{prefix}k") == 2
    finally:
        await client.aclose()
        await proxy.stop()
