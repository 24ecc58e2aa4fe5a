"""`agentmesh mesh` (`make mesh`): the whole mesh on one machine, as separate processes.

On PostgreSQL and Redis (DATABASE_URL and REDIS_URL from the environment, as for tests):

  knowledge    `agentmesh serve --services knowledge`: the index owner (embedded Qdrant)
  front-N      `agentmesh serve --services auth,users,agent,feedback,analytics`, REPLICAS
               of them; the agent's knowledge-base tool searches through Envoy, as the user,
               and its intent classifier embeds with the index owner's model (INDEX_TARGET,
               the service credential in DATA_DIR): no model, no torch in these processes
  worker-N     `agentmesh worker`: ingestion jobs from the PostgreSQL queue, writing
               through the index owner
  envoy        the mesh's front door on HTTP_PORT (REST/JSON and gRPC): one cluster per
               service over its replicas, active gRPC health checks, outlier detection

Every process gets free ports; their names, pids and ports go to DATA_DIR/mesh.json, and
their logs to DATA_DIR/mesh-logs/NAME.log. The database is created when it does not exist
and migrated, and an administrator is created on an empty one. SIGTERM or Ctrl-C drains
every process (SIGTERM, their configured grace, then SIGKILL). A member that dies is
logged and left dead: Envoy routes around it, which is what the mesh tests check.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import migrations
from server.channels import connect
from server.config import Settings
from server.envoy import EnvoySidecar
from server.envoy_mesh import mesh_envoy_config
from server.logs import configure_logging
from server.parent_death import dying_with_parent

log = logging.getLogger("agentmesh.mesh")

FRONT_SERVICES = ("auth", "users", "api_keys", "agent", "feedback", "analytics", "audit")
START_TIMEOUT = 300.0  # the knowledge process and workers load the embedding model at once
HEALTH_POLL = 0.5


@dataclass
class Member:
    """One process of the mesh."""

    name: str
    command: list[str]
    grpc_port: int | None = None
    ops_port: int | None = None
    services: list[str] = field(default_factory=list)
    pid: int | None = None
    mcp_port: int | None = None
    """The knowledge base's MCP server (server/kb_mcp.py), where it is served."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def plan(replicas: int, workers: int) -> list[Member]:
    members = [
        Member(
            "knowledge", ["serve"], free_port(), free_port(), ["knowledge"], mcp_port=free_port()
        ),
        *(
            Member(f"front-{i}", ["serve"], free_port(), free_port(), list(FRONT_SERVICES))
            for i in range(1, replicas + 1)
        ),
        *(Member(f"worker-{i}", ["worker"]) for i in range(1, workers + 1)),
    ]
    return members


def member_environment(
    settings: Settings, member: Member, knowledge: Member, envoy_port: int
) -> dict[str, str]:
    """The environment of `member`: this one's, with the mesh's wiring on top."""
    env = dict(os.environ)
    env.update(
        AGENTMESH_DATA_DIR=str(settings.data_dir),
        AGENTMESH_DATABASE_URL=settings.resolved_database_url,
        AGENTMESH_REDIS_URL=settings.redis_url or "",
        AGENTMESH_ENVOY_ENABLED="false",
        AGENTMESH_GRPC_HOST="127.0.0.1",
        AGENTMESH_METRICS_HOST="127.0.0.1",
        AGENTMESH_INDEX_TARGET=knowledge.target,
        AGENTMESH_KNOWLEDGE_TARGET=f"127.0.0.1:{envoy_port}",
    )
    if member.services:
        env["AGENTMESH_SERVICES"] = ",".join(member.services)
    if member.grpc_port is not None:
        env["AGENTMESH_GRPC_PORT"] = str(member.grpc_port)
    if member.ops_port is not None:
        env["AGENTMESH_METRICS_PORT"] = str(member.ops_port)
    if member.mcp_port is not None:
        env["AGENTMESH_MCP_PORT"] = str(member.mcp_port)
    return env


async def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of `url` when it does not exist."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(("postgresql", parts.netloc, "/postgres", parts.query, ""))
    connection = await asyncpg.connect(admin)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{name}"')
            log.info("created database", extra={"database": name})
    finally:
        await connection.close()


async def serving(target: str) -> bool:
    async with connect(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


class Mesh:
    """The mesh's processes and its Envoy; `start` brings them up, `stop` drains them."""

    def __init__(self, settings: Settings, *, replicas: int = 2, workers: int = 1) -> None:
        self._settings = settings
        self.members = plan(replicas, workers)
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self.envoy: EnvoySidecar | None = None
        self.http_port = settings.http_port or free_port()
        self.manifest = settings.data_dir / "mesh.json"

    async def start(self) -> None:
        settings = self._settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        logs = settings.data_dir / "mesh-logs"
        logs.mkdir(exist_ok=True)
        await self._prepare_database()
        knowledge = self.members[0]
        # The index owner first: workers and fronts reach it, and it creates the shard.
        for group in (self.members[:1], self.members[1:]):
            for member in group:
                await self._spawn(
                    member, member_environment(settings, member, knowledge, self.http_port), logs
                )
            await asyncio.gather(*(self._wait_serving(m) for m in group if m.grpc_port))
        self.envoy = EnvoySidecar(
            settings.resolved_envoy_binary,
            self._envoy_config(),
            settings.data_dir / "envoy",
            concurrency=settings.envoy_concurrency,
        )
        await self.envoy.start()
        self._write_manifest()
        log.info(
            "mesh serving",
            extra={
                "http": f"{settings.http_host}:{self.envoy.port}",
                "manifest": str(self.manifest),
            },
        )

    async def stop(self) -> None:
        """SIGTERM every member (each drains its RPCs), then Envoy; SIGKILL stragglers."""
        for watcher in self._watchers:
            watcher.cancel()
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        grace = self._settings.shutdown_delay_seconds + self._settings.shutdown_grace_seconds + 15
        for name, process in self._processes.items():
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                log.warning("member did not stop in time; killing it", extra={"member": name})
                process.kill()
                await process.wait()
        if self.envoy is not None:
            await self.envoy.stop()
        self.manifest.unlink(missing_ok=True)

    async def _prepare_database(self) -> None:
        url = self._settings.resolved_database_url
        await ensure_database(url)
        await asyncio.to_thread(migrations.upgrade, url)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "create-admin", "--if-no-admin",
            env=member_environment(self._settings, Member("admin", []), self.members[0], 0),
        )  # fmt: skip
        if await process.wait() != 0:
            raise RuntimeError("creating the administrator failed")

    async def _spawn(self, member: Member, env: dict[str, str], logs: Path) -> None:
        with (logs / f"{member.name}.log").open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *dying_with_parent([sys.executable, "-m", "server", *member.command]),
                env=env, stdout=output, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        member.pid = process.pid
        self._processes[member.name] = process
        self._watchers.append(asyncio.create_task(self._watch(member, process)))

    async def _watch(self, member: Member, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        log.error("mesh member exited", extra={"member": member.name, "code": code})

    async def _wait_serving(self, member: Member) -> None:
        process = self._processes[member.name]
        async with asyncio.timeout(START_TIMEOUT):
            while not await serving(member.target):
                if process.returncode is not None:
                    raise RuntimeError(
                        f"{member.name} exited with code {process.returncode} while starting;"
                        f" see {self._settings.data_dir / 'mesh-logs' / member.name}.log"
                    )
                await asyncio.sleep(HEALTH_POLL)

    def _envoy_config(self) -> dict[str, Any]:
        upstreams: dict[str, list[str]] = {}
        for member in self.members:
            for service in member.services:
                upstreams.setdefault(service, []).append(member.target)
        ops = [f"127.0.0.1:{m.ops_port}" for m in self.members if m.ops_port is not None]
        # One knowledge process here, on a free port (compose's replicas share MCP_PORT).
        mcp_port = next(m.mcp_port for m in self.members if m.mcp_port is not None)
        return mesh_envoy_config(
            self._settings,
            upstreams=upstreams,
            ops=ops,
            listen_port=self.http_port,
            mcp_port=mcp_port,
        )

    def _write_manifest(self) -> None:
        assert self.envoy is not None
        manifest = {
            "envoy": {
                "pid": self.envoy.pid,
                "http_port": self.envoy.port,
                "admin": self.envoy.admin_url,
            },
            "processes": [asdict(member) for member in self.members],
        }
        partial = self.manifest.with_suffix(".json.partial")
        partial.write_text(json.dumps(manifest, indent=2))
        partial.replace(self.manifest)


def _require_backing_services(settings: Settings) -> None:
    if not settings.resolved_database_url.startswith("postgresql"):
        raise SystemExit(
            "agentmesh mesh runs on PostgreSQL: set AGENTMESH_DATABASE_URL (make mesh does)"
        )
    if not settings.redis_url:
        raise SystemExit("agentmesh mesh runs on Redis: set AGENTMESH_REDIS_URL (make mesh does)")


async def run_mesh(settings: Settings, *, replicas: int, workers: int) -> None:
    """Bring the mesh up, serve until SIGTERM/SIGINT, then drain it."""
    configure_logging(settings.log_level, settings.log_format)
    _require_backing_services(settings)
    mesh = Mesh(settings, replicas=replicas, workers=workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        starting = asyncio.create_task(mesh.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            await stopped
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        log.info("mesh stopping")
        await mesh.stop()
        log.info("mesh stopped")
