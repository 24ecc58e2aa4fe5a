"""Idle memory per process kind: the resident set of each `agentmesh` process kind once it
serves, with no traffic, and of the ones serving the agent again after one question.

On PostgreSQL and Redis (AGENTMESH_TEST_POSTGRES_URL and AGENTMESH_TEST_REDIS_URL, as for
tests; fresh databases and key prefix), with Envoy off (its own process, ~70 MB):

  all services        `agentmesh serve` (its own database and index)
  knowledge           `serve --services knowledge`: the index owner, the embedding model
  agent               `serve --services agent`: searches and embeds through `knowledge`
  front               `serve --services auth,users,agent,feedback,analytics` (the mesh's)
  auth,users,...      `serve --services auth,users,feedback,analytics`
  worker              `agentmesh worker`, writing through `knowledge`

Each is started alone, waited for (grpc.health.v1 SERVING; the worker's "ingesting" log
line), left to settle, then its VmRSS is read from /proc and its memory map searched for
libtorch. Target (issue 17): a process without the knowledge service <= 250 MiB idle.

    python -m bench.idle_rss [--settle SECONDS]        (make bench-idle-rss)
"""

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc

from bench.mesh import START_TIMEOUT, database, environment, free_port
from server.config import ROOT
from server.mesh import serving

TARGET_MIB = 250
INDEX_TOKEN = "bench-idle-rss-" + "t" * 32
PASSWORD = "bench passphrase 42"


@dataclass(frozen=True)
class Kind:
    name: str
    argv: list[str]
    knowledge: bool  # whether it holds the embedding model by design
    agent: bool


KINDS = (
    Kind("all services", ["serve"], True, True),
    Kind("knowledge", ["serve", "--services", "knowledge"], True, False),
    Kind("agent", ["serve", "--services", "agent"], False, True),
    Kind("front (auth,users,agent,feedback,analytics)",
         ["serve", "--services", "auth,users,agent,feedback,analytics"], False, True),
    Kind("auth,users,feedback,analytics",
         ["serve", "--services", "auth,users,feedback,analytics"], False, False),
    Kind("worker", ["worker"], True, False),
)  # fmt: skip


@dataclass
class Measured:
    kind: str
    idle_mib: float
    torch: bool
    after_query_mib: float | None = None
    start_seconds: float = 0.0
    classified: str = ""  # the question's classify step detail


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@contextlib.asynccontextmanager
async def started(
    argv: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as output:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", *argv, env=env, cwd=ROOT, stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield child
    finally:
        if child.returncode is None:
            child.terminate()
            try:
                await asyncio.wait_for(child.wait(), 60)
            except TimeoutError:
                child.kill()
                await child.wait()


async def until_ready(child: asyncio.subprocess.Process, target: str | None, log: Path) -> None:
    """Serving (its health check), or for a worker its start-up log line."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if child.returncode is not None:
                raise RuntimeError(f"exited with {child.returncode} while starting; see {log}")
            if target is not None and await serving(target):
                return
            if target is None and b"agentmesh worker ingesting" in await _read(log):
                return
            await asyncio.sleep(0.5)


async def _read(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def user_token(auth_target: str) -> str:
    """A new user's access token, from a process serving AuthService."""
    email = f"bench-{time.monotonic_ns()}@example.com"
    async with grpc.aio.insecure_channel(auth_target) as channel:
        auth = auth_grpc.AuthServiceStub(channel)
        await auth.Register(
            auth_pb.RegisterRequest(email=email, password=PASSWORD, full_name="Bench")
        )
        login = await auth.Login(auth_pb.LoginRequest(email=email, password=PASSWORD))
    return login.access_token


async def ask_once(agent_target: str, token: str) -> str:
    """One question (extractive: no LLM), which is classified and searched for; how it
    was classified (the classify step's detail: "embedding" is the fast path)."""
    async with grpc.aio.insecure_channel(agent_target) as channel:
        agent = agent_grpc.AgentServiceStub(channel)
        request = agent_pb.StreamQueryRequest(query="What does the handbook say about leave?")
        metadata = (("authorization", f"Bearer {token}"),)
        detail = ""
        async for event in agent.StreamQuery(request, metadata=metadata, timeout=120):
            step = event.step if event.WhichOneof("event") == "step" else None
            if step is not None and step.step == agent_pb.STEP_CLASSIFY_INTENT and step.detail:
                detail = step.detail
    return detail


class Run:
    """Starts the kinds one after the other; the ones others need stay up until the end."""

    def __init__(self, root: Path, settle: float, stack: contextlib.AsyncExitStack) -> None:
        self.root = root
        self.settle = settle
        self.stack = stack
        self.logs = root / "logs"
        self.logs.mkdir()

    async def measure(
        self, kind: Kind, env: dict[str, str], *, keep: bool = False, auth: str | None = None
    ) -> tuple[Measured, str]:
        """`kind` measured idle and (serving the agent) after one question whose user comes
        from `auth` (default: the process itself); its gRPC target."""
        grpc_port = free_port()
        env = {
            **env,
            "AGENTMESH_GRPC_PORT": str(grpc_port),
            "AGENTMESH_METRICS_PORT": str(free_port()),
            "AGENTMESH_MCP_PORT": str(free_port()),
            "AGENTMESH_LOG_LEVEL": "INFO",
        }
        worker = kind.argv == ["worker"]
        target = f"127.0.0.1:{grpc_port}"
        log = self.logs / (kind.name.split(" ")[0].replace(",", "-") + ".log")
        began = time.monotonic()
        stack = contextlib.AsyncExitStack()
        child = await stack.enter_async_context(started(kind.argv, env, log))
        try:
            await until_ready(child, None if worker else target, log)
            ready = time.monotonic() - began
            await asyncio.sleep(self.settle)
            result = Measured(kind.name, rss_mib(child.pid), has_torch(child.pid), None, ready)
            if kind.agent:
                result.classified = await ask_once(target, await user_token(auth or target))
                await asyncio.sleep(self.settle)
                result.after_query_mib = rss_mib(child.pid)
                result.torch = result.torch or has_torch(child.pid)
        except BaseException:
            await stack.aclose()
            raise
        if keep:
            self.stack.push_async_exit(stack)
        else:
            await stack.aclose()
        print(f"  {result.kind}: {result.idle_mib:.0f} MiB", flush=True)
        return result, target


def base_environment(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return environment(
        url,
        data_dir,
        AGENTMESH_ENVOY_ENABLED="false",
        AGENTMESH_INDEX_TOKEN=INDEX_TOKEN,
        AGENTMESH_INGEST_WORKERS="1",
        **extra,
    )


async def migrate(env: dict[str, str]) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "migrate", env=env, cwd=ROOT
    )
    if await child.wait() != 0:
        raise RuntimeError("agentmesh migrate failed")


async def run(settle: float) -> list[Measured]:
    everything, knowledge, agent, front, rest, worker = KINDS
    results: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="bench-idle-rss-") as tmp:
        root = Path(tmp)
        async with database() as single_db, database() as split_db:
            single_env = base_environment(single_db, root / "single")
            await migrate(single_env)
            async with contextlib.AsyncExitStack() as stack:
                bench = Run(root, settle, stack)
                results.append((await bench.measure(everything, single_env))[0])
                # The split kinds on one database, around one index owner.
                split_env = base_environment(split_db, root / "knowledge")
                await migrate(split_env)
                measured, owner = await bench.measure(knowledge, split_env, keep=True)
                results.append(measured)
                apart = {"AGENTMESH_INDEX_TARGET": owner, "AGENTMESH_KNOWLEDGE_TARGET": owner}
                measured, auth = await bench.measure(
                    rest, base_environment(split_db, root / "rest", **apart), keep=True
                )
                for kind in (agent, front):
                    env = base_environment(split_db, root / kind.name.split(" ")[0], **apart)
                    results.append((await bench.measure(kind, env, auth=auth))[0])
                results.append(measured)
                env = base_environment(split_db, root / "worker", **apart)
                results.append((await bench.measure(worker, env))[0])
    return results


def print_table(results: list[Measured]) -> None:
    print("\n| process kind | idle RSS | after one question | torch loaded | serving after |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        after = f"{r.after_query_mib:.0f} MiB" if r.after_query_mib is not None else ""
        torch = "yes" if r.torch else "no"
        print(f"| {r.kind} | {r.idle_mib:.0f} MiB | {after} | {torch} | {r.start_seconds:.1f} s |")
    for r in results:
        if r.classified:
            print(f"{r.kind}: the question was classified as {r.classified}")
    apart = [r for r in results if not _knowledge_kind(r.kind)]
    worst = max(max(r.idle_mib, r.after_query_mib or 0) for r in apart)
    verdict = "met" if worst <= TARGET_MIB else "missed"
    print(
        f"largest without the knowledge service: {worst:.0f} MiB"
        f" (target <= {TARGET_MIB}: {verdict})"
    )


def _knowledge_kind(name: str) -> bool:
    return any(kind.knowledge for kind in KINDS if kind.name == name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before reading")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.settle))
    print_table(results)
    out = ROOT / "build" / "bench" / "idle_rss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"report: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
