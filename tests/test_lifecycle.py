"""The real `agentmesh` process: first run on an empty DATA_DIR (what `make run` does),
structured logs, health, and graceful shutdown on SIGTERM with the Envoy sidecar."""

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from grpc_health.v1 import health_pb2

from server.main import SERVICE_NAMES
from tests.harness import PASSWORD, Stubs, login, new_user, unique_email
from tests.knowledge import search, upload, wait_settled

AGENTMESH = [sys.executable, "-m", "server"]


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env.update(
        AGENTMESH_DATA_DIR=str(data_dir),
        AGENTMESH_GRPC_PORT="0",
        AGENTMESH_HTTP_PORT="0",
        AGENTMESH_METRICS_PORT="0",
        AGENTMESH_ENVOY_ADMIN_PORT="0",
        **extra,
    )
    return env


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *AGENTMESH, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


@dataclass
class Served:
    process: asyncio.subprocess.Process
    logs: list[dict[str, Any]] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)

    async def wait_for_log(
        self, message: str, timeout: float = 30, **fields: Any
    ) -> dict[str, Any]:
        """The first log line with `message` and `fields`, once it is written (a listener
        thread writes the lines: one may come after the answer it logs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs:
                if line.get("message") == message and fields.items() <= line.items():
                    return line
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"no log line {message!r}; got {[line.get('message') for line in self.logs]}"
        )


async def _collect(stream: asyncio.StreamReader, logs: list[dict[str, Any]]) -> None:
    async for raw in stream:
        with contextlib.suppress(ValueError):  # Envoy's own log lines are not JSON
            logs.append(json.loads(raw))


@contextlib.asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[Served]:
    """`agentmesh serve` until it logs that it serves; killed on exit if still running."""
    process = await asyncio.create_subprocess_exec(
        *AGENTMESH, "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    served = Served(process)
    collector = asyncio.create_task(_collect(process.stderr, served.logs))
    try:
        ready = await served.wait_for_log("agentmesh serving")
        served.addresses = {key: ready[key] for key in ("grpc", "http", "ops")}
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        collector.cancel()


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """`agentmesh migrate`, `create-admin --if-no-admin`, then `serve`, as `make run` does.
    The shutdown delay is 1.5 s unless the test parametrizes it (indirectly)."""
    env = cli_env(
        tmp_path / "data",
        AGENTMESH_SHUTDOWN_DELAY_SECONDS=getattr(request, "param", "1.5"),
        AGENTMESH_SHUTDOWN_GRACE_SECONDS="2",
    )
    assert (await run_cli("migrate", env=env))[0] == 0
    code, output = await run_cli("create-admin", "--if-no-admin", env=env)
    assert code == 0 and "initial-admin-password" in output, output
    async with serving(env) as running:
        yield running


async def test_the_embedded_index_survives_kill_9_of_the_server(tmp_path: Path) -> None:
    """Passages of READY documents are all still there after SIGKILL and a restart."""
    env = cli_env(tmp_path / "data", AGENTMESH_ENVOY_ENABLED="false")
    assert (await run_cli("migrate", env=env))[0] == 0
    expected: dict[str, int] = {}
    async with serving(env) as first:
        stubs = Stubs.connect(first.addresses["grpc"])
        account = await new_user(stubs)
        for topic in ("basalt", "gneiss", "schist"):
            text = "\n\n".join(f"{topic} sample {i} was logged on day {i}." for i in range(60))
            response = await upload(stubs, account, f"{topic}.txt", text.encode())
            document = await wait_settled(stubs, account, response.document.document_id)
            assert document.status == kb_pb.DOCUMENT_STATUS_READY
            expected[document.document_id] = document.chunk_count
        await stubs.channel.close()
        first.process.send_signal(signal.SIGKILL)
        assert await first.process.wait() == -signal.SIGKILL
    async with serving(env) as second:
        stubs = Stubs.connect(second.addresses["grpc"])
        for document_id, chunks in expected.items():
            found = await search(
                stubs, account, "sample logged", top_k=100, document_ids=[document_id]
            )
            assert len(found) == chunks
        await stubs.channel.close()


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie awaiting its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _envoy_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if "envoy" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_the_envoy_sidecar_does_not_outlive_a_killed_server(served: Served) -> None:
    envoys = _envoy_children(served.process.pid)
    assert len(envoys) == 1, envoys
    served.process.send_signal(signal.SIGKILL)
    await served.process.wait()
    deadline = time.monotonic() + 30
    while _running(envoys[0]) and time.monotonic() < deadline:  # noqa: ASYNC110 (not our child)
        await asyncio.sleep(0.1)
    assert not _running(envoys[0]), "Envoy outlived the server it fronted"


async def test_first_run_creates_one_admin_with_a_private_password(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data")
    assert (await run_cli("migrate", env=env))[0] == 0
    code, output = await run_cli("create-admin", "--if-no-admin", env=env)
    password_file = tmp_path / "data" / "initial-admin-password"
    assert code == 0 and str(password_file) in output
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    code, output = await run_cli("create-admin", "--if-no-admin", env=env)
    assert code == 0 and "none created" in output
    # With AGENTMESH_ADMIN_PASSWORD set, the output says so instead.
    env2 = cli_env(tmp_path / "data2", AGENTMESH_ADMIN_PASSWORD="an explicit operator passphrase")
    assert (await run_cli("migrate", env=env2))[0] == 0
    code, output = await run_cli("create-admin", "--if-no-admin", env=env2)
    assert code == 0 and "AGENTMESH_ADMIN_PASSWORD" in output
    assert not (tmp_path / "data2" / "initial-admin-password").exists()


async def test_serve_logs_health_and_graceful_shutdown(served: Served, tmp_path: Path) -> None:
    stubs = Stubs.connect(served.addresses["grpc"])
    http = aiohttp.ClientSession(base_url=f"http://{served.addresses['http']}")
    try:
        for service in ["", *SERVICE_NAMES]:
            response = await stubs.health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING

        # The admin created on first run can log in with the generated password.
        password = (tmp_path / "data" / "initial-admin-password").read_text().strip()
        admin = await login(stubs, "admin@example.com", password)

        async with http.get(
            "/v1/users/me",
            headers={
                "authorization": f"Bearer {admin.access_token}",
                "x-request-id": "lifecycle-1",
            },
        ) as response:
            assert response.status == 200
        rpc_line = await served.wait_for_log("rpc finished", request_id="lifecycle-1")
        assert rpc_line["rpc"] == "/agentmesh.auth.v1.UserService/GetCurrentUser"
        assert rpc_line["code"] == "OK" and rpc_line["user_id"] == admin.user_id
        assert rpc_line["latency_ms"] > 0 and rpc_line["level"] == "INFO"

        watch = stubs.health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        update = await asyncio.wait_for(watch.read(), 5)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING

        # During the shutdown delay Envoy is still up and /health says 503.
        async with http.get("/health") as response:
            body = await response.json()
            assert response.status == 503
            assert body["status"] == "NOT_SERVING"
            assert set(body["services"].values()) == {"NOT_SERVING"}

        assert await asyncio.wait_for(served.process.wait(), 10) == 0
        assert time.monotonic() - started < 1.5 + 2 + 2
        await served.wait_for_log("stopped")
        # The Envoy sidecar is gone with it.
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get("/health"):
                pass
    finally:
        await http.close()
        await stubs.channel.close()


async def test_new_rpcs_are_refused_after_sigterm(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    await served.wait_for_log("shutting down")
    await asyncio.sleep(1.7)  # past the shutdown delay: the server stops accepting
    stubs = Stubs.connect(served.addresses["grpc"])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stubs.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert raised.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    finally:
        await stubs.channel.close()
    assert await asyncio.wait_for(served.process.wait(), 10) == 0


@pytest.mark.parametrize("served", ["0"], indirect=True)
async def test_sigterm_drains_in_flight_rpcs(served: Served) -> None:
    """RPCs already running when SIGTERM arrives finish normally within the grace period
    (each Register spends real time hashing, so they are still running at the signal)."""
    stubs = Stubs.connect(served.addresses["grpc"])
    try:
        requests = [
            auth_pb.RegisterRequest(email=unique_email("drain"), password=PASSWORD)
            for _ in range(12)
        ]
        calls = [asyncio.ensure_future(stubs.auth.Register(r)) for r in requests]
        await served.wait_for_log("rpc finished")  # the first has finished; the rest run
        served.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["RegisterResponse"] * len(requests)
        assert await asyncio.wait_for(served.process.wait(), 10) == 0
        drained = [line for line in served.logs if line.get("rpc", "").endswith("/Register")]
        assert len(drained) == len(requests) and {line["code"] for line in drained} == {"OK"}
    finally:
        await stubs.channel.close()
