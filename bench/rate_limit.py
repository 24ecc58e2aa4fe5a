"""The rate limiter's cost: p50 latency and throughput of a cheap authenticated RPC
(GetCurrentUser over gRPC) on a server whose Redis rate limiter is on, divided by the same
on a server with rate limiting off, interleaved in one run. The limits are set out of
reach, so every call makes its decision (one Redis round trip covering the IP and the
user windows) and none is refused; a third server with the in-process limiter separates
the interceptor's own cost from Redis's. Target: p50 <= 1.10 x off.

    python -m bench.rate_limit [--requests N] [--rounds R] [--redis-url URL]
"""

import argparse
import asyncio
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench.rest_tax import access_token, grpc_call, measure, start_server

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "bench" / "rate_limit.json"
TARGET_P50 = 1.10


async def run(requests: int, rounds: int, redis_url: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory() as on_dir,
        tempfile.TemporaryDirectory() as local_dir,
        tempfile.TemporaryDirectory() as off_dir,
    ):
        on = await start_server(
            Path(on_dir),
            {
                "AGENTMESH_REDIS_URL": redis_url,
                "AGENTMESH_REDIS_KEY_PREFIX": f"agentmesh-bench-{uuid.uuid4().hex}:",
            },
        )
        local = await start_server(Path(local_dir))  # the in-process limiter
        off = await start_server(Path(off_dir), {"AGENTMESH_RATE_LIMIT_ENABLED": "false"})
        try:
            servers = {"limiter_on": on, "in_process": local, "limiter_off": off}
            channels = {name: grpc.aio.insecure_channel(s.grpc) for name, s in servers.items()}
            tokens = {name: await access_token(s.grpc) for name, s in servers.items()}
            calls = {name: grpc_call(channels[name], tokens[name]) for name in channels}
            for concurrency in (1, 16):
                paths = await measure(calls, concurrency, requests, rounds)
                base, limited, local_ = (
                    paths["limiter_off"],
                    paths["limiter_on"],
                    paths["in_process"],
                )
                results[str(concurrency)] = {
                    "paths": paths,
                    "p50_ratio": limited["p50_ms"] / base["p50_ms"],
                    "throughput_ratio": limited["throughput_rps"] / base["throughput_rps"],
                    "in_process_p50_ratio": local_["p50_ms"] / base["p50_ms"],
                }
            for channel in channels.values():
                await channel.close()
        finally:
            for server in (on, local, off):
                server.process.terminate()
                await server.process.wait()
    return {
        "benchmark": "rate_limit",
        "rpc": "agentmesh.auth.v1.UserService/GetCurrentUser",
        "requests_per_round": requests,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "target_p50_ratio_max": TARGET_P50,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    report = asyncio.run(run(args.requests, args.rounds, args.redis_url))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    for concurrency, block in report["results"].items():
        print(f"\nconcurrency {concurrency}")
        for name, row in block["paths"].items():
            print(
                f"  {name:<12} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms"
                f"  {row['throughput_rps']:7.0f} req/s"
            )
        verdict = "ok" if block["p50_ratio"] <= TARGET_P50 else "MISSED"
        print(
            f"  on ÷ off: p50 {block['p50_ratio']:.3f} (≤ {TARGET_P50}: {verdict}), "
            f"throughput {block['throughput_ratio']:.3f}; in-process limiter ÷ off: p50 "
            f"{block['in_process_p50_ratio']:.3f}"
        )
    print(f"\nreport: {REPORT}")


if __name__ == "__main__":
    main()
