"""The hot path: what an authenticated call costs on top of grpc.aio itself.

One run serves, each in its own process so the client's CPU is not theirs:

  empty      a grpc.aio handler for GetCurrentUser that returns a canned answer, with the
             server options agentmesh uses and no interceptors (the floor)
  chain      the same canned handler behind agentmesh's call pipeline (metrics, admission,
             request log and usage event, request checks, auth, rate limit, errors)
  servicer   the real GetCurrentUser servicer behind the same pipeline, in the same lean
             process (auth only: no model, no other service), to tell the servicer's cost
             from the full server's
  real       `agentmesh serve`: GetCurrentUser, ListConversations and ListDocuments

and calls each at 1 and 16 concurrent clients, three ways: gRPC direct, gRPC through the
Envoy sidecar (pass-through), and REST/JSON through Envoy (transcoded). Paths are
interleaved in rounds so drift hits them alike. Every row is printed as a ratio to the
empty handler on the same path and concurrency.

Targets (issue 17): GetCurrentUser at 16 clients >= 0.5 x the empty handler's calls/s, and
its p50 with one client <= 2 x the empty handler's, direct and through Envoy.

    python -m bench.hot_path [--requests N] [--rounds R] [--profile SECONDS]

`--profile` records the real server with py-spy while GetCurrentUser runs at 16 clients
and prints the functions where its CPU goes (build/bench/hot_path.profile.txt).
"""

import argparse
import asyncio
import collections
import gc
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc
from prometheus_client import CollectorRegistry

from bench.rest_tax import Call, access_token, load, measure, start_server

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "bench" / "hot_path.json"
PROFILE = ROOT / "build" / "bench" / "hot_path.profile.txt"
TARGET_THROUGHPUT = 0.5  # x the empty handler, 16 clients
TARGET_P50 = 2.0  # x the empty handler, 1 client
AGENTMESH_FRAME = re.compile(r"[(/](server|services)/")
STARTUP = re.compile(r"_find_and_load|build_application|Application\.start ")
REST_ROUTES = {
    "GetCurrentUser": "/v1/users/me",
    "ListConversations": "/v1/agent/conversations",
    "ListDocuments": "/v1/kb/documents",
}


# --- the baseline process: the empty handler, bare and behind the chain -----------------


def canned_handler() -> grpc.GenericRpcHandler:
    answer = users_pb.GetCurrentUserResponse()
    answer.user.user_id = "00000000-0000-0000-0000-000000000000"
    answer.user.email = "canned@example.com"

    async def get_current_user(
        request: users_pb.GetCurrentUserRequest, context: Any
    ) -> users_pb.GetCurrentUserResponse:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(
        get_current_user,
        request_deserializer=users_pb.GetCurrentUserRequest.FromString,
        response_serializer=users_pb.GetCurrentUserResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "agentmesh.auth.v1.UserService", {"GetCurrentUser": handler}
    )


async def serve_baseline() -> None:
    """Serve `empty`, `chain` and `servicer`, each with its own Envoy, until SIGTERM; print their
    addresses as one JSON line. Settings come from the environment, like the real server's
    (same data directory: same database and token key)."""
    from server.config import Settings
    from server.domain import Peers, build_domain
    from server.envoy import EnvoySidecar, envoy_config
    from server.logs import configure_logging
    from server.main import interceptors, server_options
    from server.servicers.users import UserServicer

    settings = Settings(services=["auth"])  # the chain needs no model and no peer
    # Logged and collected as `agentmesh serve` is: the chain writes its JSON line per call.
    configure_logging(settings.log_level, settings.log_format)
    registry = CollectorRegistry()
    domain = build_domain(settings, registry, Peers())
    await domain.start()
    gc.collect()
    gc.freeze()
    servers = {
        "empty": grpc.aio.server(options=server_options(settings)),
        "chain": grpc.aio.server(
            interceptors=interceptors(settings, domain, registry),
            options=server_options(settings),
        ),
    }
    # A second chain needs its own metrics registry (one set of RPC metrics per registry).
    servers["servicer"] = grpc.aio.server(
        interceptors=interceptors(settings, domain, CollectorRegistry()),
        options=server_options(settings),
    )
    users_grpc.add_UserServiceServicer_to_server(
        UserServicer(domain.users, domain.account_exports), servers["servicer"]
    )
    addresses: dict[str, dict[str, str]] = {}
    sidecars = []
    for name, server in servers.items():
        if name != "servicer":
            server.add_generic_rpc_handlers((canned_handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sidecar = EnvoySidecar(
            settings.resolved_envoy_binary,
            envoy_config(settings, grpc_port=port, ops_port=port),
            settings.data_dir / f"envoy-{name}",
            concurrency=settings.envoy_concurrency,
        )
        await sidecar.start()
        sidecars.append(sidecar)
        addresses[name] = {"grpc": f"127.0.0.1:{port}", "http": f"127.0.0.1:{sidecar.port}"}
    print(json.dumps(addresses), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for sidecar in sidecars:
        await sidecar.stop()
    for server in servers.values():
        await server.stop(0)
    await domain.close()


async def start_baseline(
    env: dict[str, str], log_path: Path
) -> tuple[asyncio.subprocess.Process, Any]:
    with log_path.open("wb") as log:  # its log lines go to a file, as the real server's
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.hot_path", "--baseline", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 120)
    if not line:
        raise RuntimeError("the baseline process did not start")
    return process, json.loads(line)


# --- the client --------------------------------------------------------------------------


def grpc_calls(channel: grpc.aio.Channel, token: str) -> dict[str, Call]:
    metadata = (("authorization", f"Bearer {token}"),)
    users = users_grpc.UserServiceStub(channel)
    agent = agent_grpc.AgentServiceStub(channel)
    kb = kb_grpc.KnowledgeBaseServiceStub(channel)

    def unary(method: Callable[..., Any], request: Any) -> Call:
        async def call() -> None:
            await method(request, metadata=metadata)

        return call

    return {
        "GetCurrentUser": unary(users.GetCurrentUser, users_pb.GetCurrentUserRequest()),
        "ListConversations": unary(
            agent.ListConversations, agent_pb.ListConversationsRequest(page_size=20)
        ),
        "ListDocuments": unary(kb.ListDocuments, kb_pb.ListDocumentsRequest(page_size=20)),
    }


def rest_calls(session: aiohttp.ClientSession, token: str) -> dict[str, Call]:
    headers = {"authorization": f"Bearer {token}"}

    def get(path: str) -> Call:
        async def call() -> None:
            async with session.get(path, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {response.status}")

        return call

    return {name: get(path) for name, path in REST_ROUTES.items()}


async def profile(data_dir: Path, seconds: float) -> dict[str, Any]:
    """A fresh `agentmesh serve` run under py-spy (attaching to a running process fails on
    these machines; launching works) while GetCurrentUser runs at 16 clients for `seconds`:
    own time per function and the inclusive time of agentmesh's frames, as shares of the
    samples taken while serving (start-up imports are left out)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = PROFILE.with_suffix(".collapsed")
    raw.parent.mkdir(parents=True, exist_ok=True)
    launcher = (
        py_spy, "record", "--rate", "100", "--nonblocking", "--format", "raw",
        "--output", str(raw), "--",
    )  # fmt: skip
    server = await start_server(data_dir, launcher=launcher)
    try:
        token = await access_token(server.grpc, "profiled@example.com")
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            call = grpc_calls(channel, token)["GetCurrentUser"]
            await load(call, 16, 500)  # warm up
            deadline = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < deadline:
                await load(call, 16, 500)
    finally:
        # Stop the server, not py-spy: py-spy writes its file when its child exits.
        for child in children_of(server.process.pid):
            os.kill(child, signal.SIGTERM)
        await server.process.wait()
    return summarise(raw)


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def summarise(raw: Path) -> dict[str, Any]:
    """py-spy's collapsed stacks as shares of the samples taken while serving."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if STARTUP.search(stack) or frames[-1].startswith("serve (server/main.py"):
            continue  # start-up: imports, the model, the domain, gc.collect() in serve()
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            if AGENTMESH_FRAME.search(frame):
                inclusive[frame] += samples
    return {
        "samples": total,
        "own": [(frame, n / total) for frame, n in own.most_common(25)],
        "agentmesh_inclusive": [(frame, n / total) for frame, n in inclusive.most_common(30)],
    }


def ratio_rows(paths: dict[str, Any], transport: str) -> dict[str, dict[str, float]]:
    floor = paths[f"empty/{transport}"]
    return {
        name: {
            "p50_ratio": row["p50_ms"] / floor["p50_ms"],
            "throughput_ratio": row["throughput_rps"] / floor["throughput_rps"],
        }
        for name, row in paths.items()
        if name.endswith("/" + transport)
    }


async def run(requests: int, rounds: int, profile_seconds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        server = await start_server(data_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
        env.update(
            AGENTMESH_DATA_DIR=str(data_dir),
            AGENTMESH_HTTP_PORT="0",
            AGENTMESH_ENVOY_ADMIN_PORT="0",
            AGENTMESH_RATE_LIMIT_PER_USER="100000000",
            AGENTMESH_RATE_LIMIT_PER_IP="100000000",
            AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_IP="100000000",
        )
        channels: list[grpc.aio.Channel] = []
        sessions: list[aiohttp.ClientSession] = []
        baseline: asyncio.subprocess.Process | None = None
        try:
            baseline, addresses = await start_baseline(env, data_dir / "baseline.log")
            addresses["real"] = {"grpc": server.grpc, "http": server.http}
            token = await access_token(server.grpc)
            calls: dict[str, Call] = {}
            for kind, where in addresses.items():
                direct = grpc.aio.insecure_channel(where["grpc"])
                via_envoy = grpc.aio.insecure_channel(where["http"])
                rest = aiohttp.ClientSession(base_url=f"http://{where['http']}")
                channels += [direct, via_envoy]
                sessions.append(rest)
                for transport, rpcs in (
                    ("grpc", grpc_calls(direct, token)),
                    ("grpc_envoy", grpc_calls(via_envoy, token)),
                    ("rest_envoy", rest_calls(rest, token)),
                ):
                    for rpc, call in rpcs.items():
                        if kind == "real" or rpc == "GetCurrentUser":
                            label = kind if kind != "real" else rpc
                            calls[f"{label}/{transport}"] = call
            results: dict[str, Any] = {}
            for concurrency in (1, 16):
                paths = await measure(calls, concurrency, requests, rounds)
                results[str(concurrency)] = {
                    "paths": paths,
                    "ratios": {
                        transport: ratio_rows(paths, transport)
                        for transport in ("grpc", "grpc_envoy", "rest_envoy")
                    },
                }
        finally:
            for session in sessions:
                await session.close()
            for channel in channels:
                await channel.close()
            if baseline is not None:
                baseline.terminate()
                await baseline.wait()
            server.process.terminate()
            await server.process.wait()
        profiled = (
            await profile(Path(tempfile.mkdtemp(dir=data_dir)), profile_seconds)
            if profile_seconds
            else None
        )
    return {
        "benchmark": "hot_path",
        "requests_per_round": requests,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "targets": {"throughput_ratio_min_16": TARGET_THROUGHPUT, "p50_ratio_max_1": TARGET_P50},
        "results": results,
        "profile": profiled,
    }


def verdict(rpc: str, concurrency: str, ratio: dict[str, float]) -> str:
    if rpc != "GetCurrentUser":
        return ""
    if concurrency == "16":
        ok = ratio["throughput_ratio"] >= TARGET_THROUGHPUT
        return f"  target calls/s >= {TARGET_THROUGHPUT}: {'ok' if ok else 'MISSED'}"
    ok = ratio["p50_ratio"] <= TARGET_P50
    return f"  target p50 <= {TARGET_P50}: {'ok' if ok else 'MISSED'}"


def print_report(report: dict[str, Any]) -> None:
    for concurrency, block in report["results"].items():
        print(f"\nconcurrency {concurrency}")
        print(f"  {'call':<32} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9}")
        for name, row in sorted(block["paths"].items(), key=lambda item: item[0].split("/")[1]):
            p50, p99, rps = row["p50_ms"], row["p99_ms"], row["throughput_rps"]
            print(f"  {name:<32} {p50:8.3f} {p99:8.3f} {rps:9.0f}")
        for transport, rows in block["ratios"].items():
            print(f"  ÷ empty/{transport}:")
            for name, ratio in rows.items():
                rpc = name.split("/")[0]
                print(
                    f"    {rpc:<18} p50 {ratio['p50_ratio']:6.2f}  "
                    f"calls/s {ratio['throughput_ratio']:5.2f}"
                    f"{verdict(rpc, concurrency, ratio)}"
                )
    if report["profile"]:
        lines = [f"py-spy, {report['profile']['samples']} samples of the real server"]
        lines.append("\nown time (top 25):")
        lines += [f"  {share:6.1%}  {frame}" for frame, share in report["profile"]["own"]]
        lines.append("\nagentmesh frames, inclusive (top 25):")
        lines += [
            f"  {share:6.1%}  {frame}" for frame, share in report["profile"]["agentmesh_inclusive"]
        ]
        PROFILE.write_text("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines))
    print(f"\nreport: {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        asyncio.run(serve_baseline())
        return
    report = asyncio.run(run(args.requests, args.rounds, args.profile))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
