"""The floor under the rate limiter's cost: what one Redis decision (the limiter's Lua
script over an IP and a user window) adds to a gRPC call, apart from everything else
agentmesh does. A bare grpc.aio server answers two methods, one at once and one after
`RedisRateLimiter.hit_all`, interleaved in one run; the same decision is also timed alone,
outside gRPC. See bench/rate_limit.py for the whole server.

    python -m bench.redis_round_trip [--calls N] [--rounds R] [--redis-url URL]
"""

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from redis.asyncio import BlockingConnectionPool, Redis

from services.limits.redis_window import RedisRateLimiter

CHECKS = [("ip:192.0.2.1", 10**9), ("user:bench", 10**9)]  # never refused


async def timed_us(call: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def run(calls: int, rounds: int, redis_url: str) -> None:
    pool = BlockingConnectionPool.from_url(
        redis_url, max_connections=64, timeout=None, socket_timeout=0.05
    )
    redis = Redis.from_pool(pool)
    limiter = RedisRateLimiter(redis, prefix=f"agentmesh-bench-{uuid.uuid4().hex}:")

    async def bare(request: bytes, context: Any) -> bytes:
        return b"ok"

    async def decided(request: bytes, context: Any) -> bytes:
        await limiter.hit_all(CHECKS, 60)
        return b"ok"

    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Bare": grpc.unary_unary_rpc_method_handler(bare),
        "Decided": grpc.unary_unary_rpc_method_handler(decided),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results: dict[str, list[float]] = {"bare rpc": [], "rpc + decision": [], "decision": []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        bare_call: Any = channel.unary_unary("/bench.S/Bare")
        decided_call: Any = channel.unary_unary("/bench.S/Decided")
        paths: dict[str, Callable[[], Awaitable[Any]]] = {
            "bare rpc": lambda: bare_call(b"x"),
            "rpc + decision": lambda: decided_call(b"x"),
            "decision": lambda: limiter.hit_all(CHECKS, 60),
        }
        for _ in range(rounds):
            for name, call in paths.items():
                results[name] += await timed_us(call, calls)
    await server.stop(0)
    await redis.aclose()
    medians = {name: statistics.median(samples) for name, samples in results.items()}
    for name, value in medians.items():
        print(f"{name:<15} p50 {value:7.0f} µs")
    added = medians["rpc + decision"] - medians["bare rpc"]
    print(f"a decision adds {added:.0f} µs inside grpc.aio, {medians['decision']:.0f} µs alone")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds, args.redis_url))


if __name__ == "__main__":
    main()
