"""The REST tax: a cheap authenticated RPC (GetCurrentUser) called three ways against one
running `agentmesh serve` (with its Envoy sidecar), in the same run:

  grpc_direct  generated stub → gRPC server                     (the baseline)
  grpc_envoy   generated stub → Envoy (pass-through) → gRPC server
  rest_envoy   HTTP/JSON GET /v1/users/me → Envoy (transcoding) → gRPC server

Paths are interleaved in rounds (so drift hits them alike) at concurrency 1 and 16. The
report gives p50 latency and throughput per path and their ratios to grpc_direct.
Targets: p50 <= 1.20 x direct, throughput >= 0.80 x direct.

    python -m bench.rest_tax [--requests N] [--rounds R]
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "bench" / "rest_tax.json"
PASSWORD = "benchmark passphrase 42"
TARGET_P50 = 1.20
TARGET_THROUGHPUT = 0.80

Call = Callable[[], Awaitable[None]]


@dataclass
class Server:
    process: asyncio.subprocess.Process
    grpc: str
    http: str


async def start_server(
    data_dir: Path, extra_env: dict[str, str] | None = None, launcher: tuple[str, ...] = ()
) -> Server:
    """`agentmesh serve` (after `agentmesh migrate`) on free ports, with `extra_env` settings;
    `launcher` goes before the command (a profiler)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    # One client hammers the server from one address: limits it cannot reach (the
    # limiter still runs on every call, as in production).
    env.update(
        AGENTMESH_RATE_LIMIT_PER_USER="100000000",
        AGENTMESH_RATE_LIMIT_PER_IP="100000000",
        AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_IP="100000000",
        AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_ACCOUNT="100000000",
    )
    env.update(extra_env or {})
    env.update(
        AGENTMESH_DATA_DIR=str(data_dir),
        AGENTMESH_GRPC_PORT="0",
        AGENTMESH_HTTP_PORT="0",
        AGENTMESH_METRICS_PORT="0",
        AGENTMESH_ENVOY_ADMIN_PORT="0",
        AGENTMESH_MCP_PORT="0",
    )
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "migrate", env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await migrate.wait() == 0, "migration failed"
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:  # the server logs one JSON line per RPC, as in production
        process = await asyncio.create_subprocess_exec(
            *launcher, sys.executable, "-m", "server", "serve", env=env, stderr=log
        )
    deadline = time.monotonic() + 120  # loading the model takes a while on a busy machine
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"agentmesh serving"' in line:
                ready = json.loads(line)
                return Server(process, ready["grpc"], ready["http"])
        await asyncio.sleep(0.1)
    process.kill()
    raise RuntimeError(f"agentmesh did not start:\n{log_path.read_text()}")


async def access_token(target: str, email: str = "loadgen@example.com") -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        auth = auth_grpc.AuthServiceStub(channel)
        await auth.Register(auth_pb.RegisterRequest(email=email, password=PASSWORD))
        login = await auth.Login(auth_pb.LoginRequest(email=email, password=PASSWORD))
        return login.access_token


def grpc_call(channel: grpc.aio.Channel, token: str) -> Call:
    stub = users_grpc.UserServiceStub(channel)
    request = users_pb.GetCurrentUserRequest()
    metadata = (("authorization", f"Bearer {token}"),)

    async def call() -> None:
        await stub.GetCurrentUser(request, metadata=metadata)

    return call


def rest_call(session: aiohttp.ClientSession, token: str) -> Call:
    headers = {"authorization": f"Bearer {token}"}

    async def call() -> None:
        async with session.get("/v1/users/me", headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"REST call failed with HTTP {response.status}")

    return call


async def load(call: Call, concurrency: int, requests: int) -> tuple[list[float], float]:
    """Run `requests` calls from `concurrency` workers: per-call latencies and wall time."""
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def measure(
    calls: dict[str, Call], concurrency: int, requests: int, rounds: int
) -> dict[str, Any]:
    for call in calls.values():  # warm up connections, caches and JITs alike
        await load(call, concurrency, max(100, requests // 10))
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    elapsed = dict.fromkeys(calls, 0.0)
    order = list(calls)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            samples, wall = await load(calls[name], concurrency, requests)
            latencies[name].extend(samples)
            elapsed[name] += wall
    return {
        name: {
            "p50_ms": statistics.median(latencies[name]) * 1000,
            "p99_ms": statistics.quantiles(latencies[name], n=100)[98] * 1000,
            "throughput_rps": len(latencies[name]) / elapsed[name],
            "requests": len(latencies[name]),
        }
        for name in calls
    }


def ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    base = result["grpc_direct"]
    return {
        name: {
            "p50_ratio": result[name]["p50_ms"] / base["p50_ms"],
            "throughput_ratio": result[name]["throughput_rps"] / base["throughput_rps"],
        }
        for name in ("grpc_envoy", "rest_envoy")
    }


def print_report(report: dict[str, Any]) -> None:
    for concurrency, block in report["results"].items():
        print(f"\nconcurrency {concurrency}")
        print(f"  {'path':<12} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
        for name, row in block["paths"].items():
            p50, p99, rps = row["p50_ms"], row["p99_ms"], row["throughput_rps"]
            print(f"  {name:<12} {p50:8.3f} {p99:8.3f} {rps:9.0f}")
        for name, ratio in block["ratios"].items():
            p50_ok = "ok" if ratio["p50_ratio"] <= TARGET_P50 else "MISSED"
            rps_ok = "ok" if ratio["throughput_ratio"] >= TARGET_THROUGHPUT else "MISSED"
            print(
                f"  {name} ÷ grpc_direct: p50 {ratio['p50_ratio']:.3f} (≤ {TARGET_P50}: {p50_ok}), "
                f"throughput {ratio['throughput_ratio']:.3f} (≥ {TARGET_THROUGHPUT}: {rps_ok})"
            )
    print(f"\nreport: {REPORT}")


async def run(requests: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = await start_server(Path(tmp))
        try:
            token = await access_token(server.grpc)
            direct = grpc.aio.insecure_channel(server.grpc)
            via_envoy = grpc.aio.insecure_channel(server.http)
            rest = aiohttp.ClientSession(base_url=f"http://{server.http}")
            calls = {
                "grpc_direct": grpc_call(direct, token),
                "grpc_envoy": grpc_call(via_envoy, token),
                "rest_envoy": rest_call(rest, token),
            }
            results = {}
            for concurrency in (1, 16):
                paths = await measure(calls, concurrency, requests, rounds)
                results[str(concurrency)] = {"paths": paths, "ratios": ratios(paths)}
            await rest.close()
            await direct.close()
            await via_envoy.close()
        finally:
            server.process.terminate()
            await server.process.wait()
    return {
        "benchmark": "rest_tax",
        "rpc": "agentmesh.auth.v1.UserService/GetCurrentUser",
        "requests_per_round": requests,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "targets": {"p50_ratio_max": TARGET_P50, "throughput_ratio_min": TARGET_THROUGHPUT},
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    report = asyncio.run(run(args.requests, args.rounds))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
