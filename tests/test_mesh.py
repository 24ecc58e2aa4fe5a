"""`agentmesh mesh` as `make mesh` runs it: real processes (the index owner, two replicas of
the stateless services, an ingestion worker) behind one real Envoy, on PostgreSQL and
Redis. The README's REST tour, load spread over replicas, a replica killed with -9, and
SIGTERM draining every process."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import ROOT
from tests.backends import (
    create_postgres_database,
    drop_postgres_database,
    postgres_reachable,
    require_service,
)
from tests.harness import TEST_JWT_SECRET, unique_email
from tests.limited import REDIS_URL, redis_up

pytestmark = pytest.mark.slow

START_TIMEOUT = 420.0  # the knowledge process and a worker load the model at once on two cores
PASSWORD = "mesh passphrase 42"


@dataclass
class RunningMesh:
    process: asyncio.subprocess.Process
    data_dir: Path
    manifest: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.manifest['envoy']['http_port']}"

    def member(self, name: str) -> dict[str, Any]:
        return next(m for m in self.manifest["processes"] if m["name"] == name)

    def pids(self) -> list[int]:
        return [m["pid"] for m in self.manifest["processes"]] + [self.manifest["envoy"]["pid"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of the mesh that exited but is not reaped yet is a zombie: not alive.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningMesh]:
    if not await postgres_reachable():
        require_service("PostgreSQL is not reachable")
    await redis_up()
    name, url = await create_postgres_database()
    data_dir = tmp_path_factory.mktemp("mesh")
    env = {
        **os.environ,
        "AGENTMESH_DATABASE_URL": url,
        "AGENTMESH_REDIS_URL": REDIS_URL,
        "AGENTMESH_REDIS_KEY_PREFIX": f"mesh-{uuid.uuid4().hex[:8]}:",
        "AGENTMESH_DATA_DIR": str(data_dir),
        "AGENTMESH_HTTP_PORT": "0",
        "AGENTMESH_ENVOY_ADMIN_PORT": "0",
        "AGENTMESH_JWT_SECRET": TEST_JWT_SECRET,
        "AGENTMESH_ADMIN_PASSWORD": PASSWORD,
        "AGENTMESH_LOG_FORMAT": "text",
        "AGENTMESH_SHUTDOWN_GRACE_SECONDS": "2",
        "AGENTMESH_RATE_LIMIT_PER_USER": "1000000",
        "AGENTMESH_RATE_LIMIT_PER_IP": "1000000",
        "AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_IP": "1000000",
        "AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_ACCOUNT": "1000000",
    }
    log = (data_dir / "mesh.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "mesh", env=env, cwd=ROOT, stdout=log, stderr=log
    )
    manifest_path = data_dir / "mesh.json"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not manifest_path.exists():
            if process.returncode is not None:
                raise AssertionError(f"the mesh exited: {(data_dir / 'mesh.log').read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the mesh did not start: {(data_dir / 'mesh.log').read_text()}"
                )
            await asyncio.sleep(1)
        yield RunningMesh(process, data_dir, json.loads(manifest_path.read_text()))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 120)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()
        await drop_postgres_database(name)


@pytest.fixture(scope="module")
async def http(mesh: RunningMesh) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=mesh.url) as session:
        yield session


async def token(http: aiohttp.ClientSession, email: str, password: str) -> str:
    async with http.post("/v1/auth/login", json={"email": email, "password": password}) as r:
        assert r.status == 200, await r.text()
        access: str = (await r.json())["access_token"]
        return access


async def account(http: aiohttp.ClientSession, prefix: str) -> dict[str, str]:
    """A new account registered over REST; its authorization header."""
    email = unique_email(prefix)
    body = {"email": email, "password": PASSWORD, "full_name": prefix}
    async with http.post("/v1/auth/register", json=body) as response:
        assert response.status == 200
    return {"authorization": f"Bearer {await token(http, email, PASSWORD)}"}


def readme_tour() -> str:
    """The REST tour's shell block, as the README shows it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A tour", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


async def test_the_readme_rest_tour_works_through_the_mesh(
    mesh: RunningMesh, http: aiohttp.ClientSession
) -> None:
    admin = await token(http, "admin@example.com", PASSWORD)
    script = readme_tour().replace("localhost:8080", mesh.url.removeprefix("http://"))
    # Every call must succeed: curl fails on an HTTP error and the script stops there.
    prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'
    completed = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", prelude + script],
        env={**os.environ, "ADMIN_TOKEN": admin},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert '"email":"ada@example.com"' in completed.stdout
    assert "data: " in completed.stdout  # the streamed run arrived as server-sent events
    assert '"completed"' in completed.stdout


async def rpc_count(http: aiohttp.ClientSession, ops_port: int, method: str) -> float:
    async with http.get(f"http://127.0.0.1:{ops_port}/metrics") as response:
        text = await response.text()
    pattern = rf'grpc_server_handled_total\{{[^}}]*grpc_method="{method}"[^}}]*\}} (\S+)'
    return sum(float(value) for value in re.findall(pattern, text))


async def test_requests_are_served_by_both_replicas(
    mesh: RunningMesh, http: aiohttp.ClientSession
) -> None:
    headers = await account(http, "spread")
    fronts = [mesh.member("front-1"), mesh.member("front-2")]
    before = [await rpc_count(http, f["ops_port"], "GetCurrentUser") for f in fronts]
    for _ in range(40):
        async with http.get("/v1/users/me", headers=headers) as r:
            assert r.status == 200
    after = [await rpc_count(http, f["ops_port"], "GetCurrentUser") for f in fronts]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 40 and all(count > 0 for count in served), served


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data:"):
            yield json.loads(text[len("data:") :])


async def test_a_dropped_stream_is_resumed_through_the_mesh(
    mesh: RunningMesh, http: aiohttp.ClientSession
) -> None:
    """Started on one replica, re-attached on whichever Envoy picks (the run log is in
    Redis): every event once, in order, and the same events a second client replays."""
    headers = await account(http, "resumer")
    seen: list[dict[str, Any]] = []
    query = {"query": "What is the capital of the Netherlands?"}
    async with http.post("/v1/agent/query:stream", json=query, headers=headers) as sse:
        async for event in sse_events(sse):
            seen.append(event)
            if len(seen) == 2:
                break  # the connection goes mid-run
    run_id, last = seen[0]["run_id"], seen[-1]["seq"]
    attach = f"/v1/agent/runs/{run_id}:attach"
    async with http.post(attach, json={"after_seq": last}, headers=headers) as sse:
        resumed = seen + [event async for event in sse_events(sse)]
    assert [e["seq"] for e in resumed] == list(range(1, len(resumed) + 1))
    assert {e["run_id"] for e in resumed} == {run_id}
    completed = resumed[-1]["completed"]["message"]["content"]
    assert "".join(e["token"]["text"] for e in resumed if "token" in e) == completed
    async with http.post(attach, json={"after_seq": 0}, headers=headers) as sse:
        assert [event async for event in sse_events(sse)] == resumed

    stranger = await account(http, "stranger")
    async with http.post(attach, json={"after_seq": 0}, headers=stranger) as response:
        assert "RUN_NOT_FOUND" in await response.text()


async def test_only_the_knowledge_process_and_workers_load_the_model(
    mesh: RunningMesh, http: aiohttp.ClientSession
) -> None:
    """The fronts serve the agent without torch: its intent classifier embeds through the
    knowledge process (INDEX_TARGET), on the fast path."""
    headers = await account(http, "classified")
    query = {"query": "hello there!"}
    async with http.post("/v1/agent/query:stream", json=query, headers=headers) as sse:
        steps = [event["step"] async for event in sse_events(sse) if "step" in event]
    [detail] = [
        step["detail"]
        for step in steps
        if step["step"] == "STEP_CLASSIFY_INTENT" and step["status"] == "STEP_STATUS_COMPLETED"
    ]
    assert detail.startswith("greeting (embedding, similarity "), detail
    for member in mesh.manifest["processes"]:
        maps = await asyncio.to_thread(Path(f"/proc/{member['pid']}/maps").read_text)
        holds_model = member["name"] == "knowledge" or member["name"].startswith("worker")
        assert ("libtorch" in maps) == holds_model, member["name"]


async def test_killing_a_replica_loses_almost_nothing(
    mesh: RunningMesh, http: aiohttp.ClientSession
) -> None:
    headers = await account(http, "survivor")

    async def ok() -> bool:
        async with http.get("/v1/users/me", headers=headers) as response:
            return response.status == 200

    victim = mesh.member("front-1")["pid"]
    os.kill(victim, signal.SIGKILL)
    right_after = [await ok() for _ in range(100)]
    assert sum(right_after) >= 95, f"{right_after.count(False)} of 100 failed"
    await asyncio.sleep(5)
    later = [await ok() for _ in range(50)]
    assert all(later), f"{later.count(False)} of 50 failed 5 s after the kill"


async def test_sigterm_drains_every_process(mesh: RunningMesh) -> None:
    pids = [pid for pid in mesh.pids() if _alive(pid)]
    assert len(pids) >= 4  # knowledge, a front, a worker, Envoy (one front was killed)
    mesh.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(mesh.process.wait(), 120)
    assert code == 0, (mesh.data_dir / "mesh.log").read_text()[-3000:]
    assert not any(_alive(pid) for pid in pids)
    assert not (mesh.data_dir / "mesh.json").exists()
