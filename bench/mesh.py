"""The mesh's tax: a request whose service runs in another process, through Envoy, against
the same request all-in-one, in the same run.

Two stacks run side by side on PostgreSQL and Redis (AGENTMESH_TEST_POSTGRES_URL and
AGENTMESH_TEST_REDIS_URL, as for tests; each gets a fresh database and key prefix):

  all-in-one   `agentmesh serve`: every service in one process, its Envoy sidecar in front
  mesh         `agentmesh mesh`: the knowledge service, two replicas of the stateless
               services and a worker as separate processes behind one Envoy

Each gets the same user and document. Then, alternating per query between the stacks:

  agent query  POST /v1/agent/query (extractive: no LLM), whose knowledge-base tool in the
               mesh crosses to the knowledge process through Envoy, as the user
  kb search    POST /v1/kb/search, which the mesh's Envoy routes to the knowledge process

and prints p50/p95 of each and the ratios mesh ÷ all-in-one (target for the agent query:
<= 1.2). Every query is different, so no cache answers it. Then the re-attach latency:
a streamed run is dropped after its first event and re-attached (`AttachRun` over
REST/SSE, on whichever replica Envoy picks), timed to the first event that arrives.

    python -m bench.mesh [--queries N]        (make bench-mesh)
"""

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from server.config import ROOT

POSTGRES = os.environ.get(
    "AGENTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS = os.environ.get("AGENTMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "bench passphrase 42"
START_TIMEOUT = 600.0
TARGET = 1.2
TOPICS = (
    "cooling", "fuel", "staff", "budget", "safety", "history", "design", "location",
    "output", "inspection",
)  # fmt: skip
DOCUMENT = "\n\n".join(
    f"The Kestrel reactor's {topic}: paragraph {i} records how the {topic} of the Kestrel "
    f"research reactor was reviewed in year {1960 + i}, with notes from the site team."
    for i, topic in enumerate(TOPICS)
)


# The timed requests: REST path and the body's fields beside `query`.
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "agent query": ("/v1/agent/query", {}),
    "kb search": ("/v1/kb/search", {"top_k": 5}),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    name = f"agentmesh_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def environment(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AGENTMESH_DATABASE_URL": url,
        "AGENTMESH_REDIS_URL": REDIS,
        "AGENTMESH_REDIS_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:",
        "AGENTMESH_DATA_DIR": str(data_dir),
        "AGENTMESH_JWT_SECRET": "bench-" + "j" * 40,
        "AGENTMESH_LOG_LEVEL": "WARNING",
        "AGENTMESH_RATE_LIMIT_PER_USER": "100000000",
        "AGENTMESH_RATE_LIMIT_PER_IP": "100000000",
        "AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_IP": "100000000",
        "AGENTMESH_QUOTA_USER_DAILY_QUERIES": "0",  # 0: unlimited
        "AGENTMESH_QUOTA_USER_MONTHLY_QUERIES": "0",
        "AGENTMESH_SHUTDOWN_GRACE_SECONDS": "2",
        **extra,
    }


@contextlib.asynccontextmanager
async def process(argv: list[str], env: dict[str, str], log: Path) -> AsyncIterator[None]:
    with log.open("wb") as output:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", *argv, env=env, cwd=ROOT, stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield
        finally:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.wait(), 120)
                except TimeoutError:
                    child.kill()
                    await child.wait()


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {START_TIMEOUT:.0f} s")
        await asyncio.sleep(1)


async def ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/health") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def prepare(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """A user with the benchmark's document, READY; the user's auth header."""
    email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
    body = {"email": email, "password": PASSWORD, "full_name": "Bench"}
    async with http.post(f"{url}/v1/auth/register", json=body) as response:
        assert response.status == 200, await response.text()
    login = {"email": email, "password": PASSWORD}
    async with http.post(f"{url}/v1/auth/login", json=login) as response:
        headers = {"authorization": f"Bearer {(await response.json())['access_token']}"}
    upload = {"filename": "kestrel.txt", "content": base64.b64encode(DOCUMENT.encode()).decode()}
    async with http.post(f"{url}/v1/kb/documents", json=upload, headers=headers) as response:
        assert response.status == 200, await response.text()
        document_id = (await response.json())["document"]["document_id"]

    async def indexed() -> bool:
        async with http.get(f"{url}/v1/kb/documents/{document_id}", headers=headers) as r:
            status: str = (await r.json())["document"]["status"]
            if status == "DOCUMENT_STATUS_FAILED":
                raise RuntimeError("the benchmark's document failed to ingest")
            return status == "DOCUMENT_STATUS_READY"

    await wait_for(indexed, "ingestion")
    return headers


async def timed(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> float:
    started = time.perf_counter()
    async with http.post(url, json=body, headers=headers) as response:
        payload = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status} {payload[:300]!r}")
    return time.perf_counter() - started


async def first_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    async for line in response.content:
        if line.startswith(b"data:"):
            event: dict[str, Any] = json.loads(line[len(b"data:") :])
            return event
    raise RuntimeError("the stream ended without an event")


async def reattach(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], query: str
) -> float:
    """Start a streamed run, drop it after its first event, and time re-attaching: from
    the attach request to its first event (the run's next one)."""
    async with http.post(
        f"{url}/v1/agent/query:stream", json={"query": query}, headers=headers
    ) as sse:
        started = await first_event(sse)
    attach = f"{url}/v1/agent/runs/{started['run_id']}:attach"
    began = time.perf_counter()
    async with http.post(attach, json={"after_seq": started["seq"]}, headers=headers) as sse:
        following = await first_event(sse)
        elapsed = time.perf_counter() - began
    if following.get("seq") != started["seq"] + 1:
        raise RuntimeError(f"re-attached to {following!r}, not to the next event")
    return elapsed


def quantiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=20, method="inclusive")
    return statistics.median(samples) * 1000, cuts[18] * 1000


async def run(queries: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp:
        root = Path(tmp)
        single_port = free_port()
        async with (
            database() as single_db,
            database() as mesh_db,
            aiohttp.ClientSession() as http,
        ):
            single_env = environment(
                single_db,
                root / "single",
                AGENTMESH_HTTP_PORT=str(single_port),
                AGENTMESH_GRPC_PORT=str(free_port()),
                AGENTMESH_METRICS_PORT=str(free_port()),
                AGENTMESH_ENVOY_ADMIN_PORT=str(free_port()),
                AGENTMESH_MCP_PORT=str(free_port()),
            )
            mesh_env = environment(
                mesh_db, root / "mesh", AGENTMESH_HTTP_PORT="0", AGENTMESH_ENVOY_ADMIN_PORT="0"
            )
            (root / "single").mkdir()
            (root / "mesh").mkdir()
            migrate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server", "migrate", env=single_env, cwd=ROOT
            )
            if await migrate.wait() != 0:
                raise RuntimeError("agentmesh migrate failed")
            async with (
                process(["serve"], single_env, root / "single.log"),
                process(["mesh"], mesh_env, root / "mesh.log"),
            ):
                single = f"http://127.0.0.1:{single_port}"
                manifest = root / "mesh" / "mesh.json"
                await wait_for(lambda: ready(http, single), "agentmesh serve")

                async def mesh_up() -> bool:
                    return manifest.exists()

                await wait_for(mesh_up, "agentmesh mesh")
                mesh = f"http://127.0.0.1:{json.loads(manifest.read_text())['envoy']['http_port']}"
                print("both stacks up; preparing", flush=True)
                headers = {single: await prepare(http, single), mesh: await prepare(http, mesh)}
                report: dict[str, Any] = {"queries": queries}
                for name, (path, extra) in REQUESTS.items():
                    samples: dict[str, list[float]] = {single: [], mesh: []}
                    for stack in (single, mesh):  # one untimed call each: connections, warm-up
                        await timed(
                            http, stack + path, {"query": "warm up", **extra}, headers[stack]
                        )
                    for i in range(queries):
                        topic = TOPICS[i % len(TOPICS)]
                        query = f"What was noted about the {topic} in review {i} ({name})?"
                        order = (single, mesh) if i % 2 == 0 else (mesh, single)
                        for stack in order:
                            samples[stack].append(
                                await timed(
                                    http, stack + path, {"query": query, **extra}, headers[stack]
                                )
                            )
                    p50_single, p95_single = quantiles(samples[single])
                    p50_mesh, p95_mesh = quantiles(samples[mesh])
                    report[name] = {
                        "p50_all_in_one_ms": p50_single,
                        "p95_all_in_one_ms": p95_single,
                        "p50_mesh_ms": p50_mesh,
                        "p95_mesh_ms": p95_mesh,
                        "ratio": p50_mesh / p50_single,
                    }
                latencies: dict[str, list[float]] = {single: [], mesh: []}
                for i in range(max(queries // 3, 5)):
                    for stack in (single, mesh) if i % 2 == 0 else (mesh, single):
                        query = f"Summarize the {TOPICS[i % len(TOPICS)]} notes, run {i}."
                        latencies[stack].append(await reattach(http, stack, headers[stack], query))
                report["re-attach"] = {
                    "runs": len(latencies[mesh]),
                    "p50_all_in_one_ms": quantiles(latencies[single])[0],
                    "p50_mesh_ms": quantiles(latencies[mesh])[0],
                    "p95_mesh_ms": quantiles(latencies[mesh])[1],
                }
                return report


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['queries']} queries per request kind, alternating between the stacks")
    for name in REQUESTS:
        r = report[name]
        target = f" (target <= {TARGET})" if name == "agent query" else ""
        print(
            f"{name:>12}: all-in-one p50 {r['p50_all_in_one_ms']:7.2f} ms"
            f" p95 {r['p95_all_in_one_ms']:7.2f} | mesh p50 {r['p50_mesh_ms']:7.2f} ms"
            f" p95 {r['p95_mesh_ms']:7.2f} -> ratio {r['ratio']:.3f}{target}"
        )


def print_reattach(report: dict[str, Any]) -> None:
    r = report["re-attach"]
    print(
        f"   re-attach: first event after the attach request, {r['runs']} runs each:"
        f" all-in-one p50 {r['p50_all_in_one_ms']:.2f} ms | mesh p50 {r['p50_mesh_ms']:.2f} ms"
        f" p95 {r['p95_mesh_ms']:.2f} ms"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.queries))
    print_report(report)
    print_reattach(report)
    out = ROOT / "build" / "bench" / "mesh.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
